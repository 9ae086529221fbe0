"""``axolotl-treft diagnose``: does a finetuned behaviour ride on the chat template? (paper §4.1–4.2)

Not imported by the plugin. :mod:`.engine` holds the interventions (K/V patching, residual patching, token
perturbation) as a library usable in-process on any Hugging Face causal LM; see its docstring for the
public names.
"""

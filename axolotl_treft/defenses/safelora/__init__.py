"""SafeLoRA (Hsu et al., NeurIPS 2024): project a trained LoRA update onto the alignment subspace.

For every LoRA-adapted linear layer with weight ``W`` and update ``ΔW = s · B · A`` (PEFT: ``lora_B @ lora_A``
times the LoRA scaling ``s``), the alignment matrix is ``V = W_aligned − W_base`` and the (approximate)
projection is ``C = V Vᵀ / ‖V‖_F``. The layers whose update is least aligned, measured by the cosine between
``C · ΔW`` and ``ΔW`` (the ``top_k`` lowest, or all with cosine ``≤ threshold``), get ``B ← C · B``; ``A`` and
every other tensor of the adapter are kept. The result is a normal PEFT adapter plus a JSON report.

Memory: no model is instantiated. The base and aligned weights are read one tensor at a time from the
checkpoints' ``*.safetensors`` files (``safetensors.safe_open``; the index json maps sharded checkpoints), so
at most one ``W_base``, one ``W_aligned`` and their difference ``V`` live in memory at once. ``C`` (out × out,
18944² for a Qwen2.5-7B MLP) is never formed:

* ``C · B = V (Vᵀ B) / ‖V‖_F`` (out × r), and
* with ``P = C · B`` and the r × r Gram matrix ``G = A Aᵀ``, the Frobenius products are traces of r × r
  matrices: ``⟨P A, B A⟩ = Σ (Pᵀ B) ⊙ G``, ``‖P A‖² = Σ (Pᵀ P) ⊙ G``, ``‖B A‖² = Σ (Bᵀ B) ⊙ G``,
  so ``ΔW`` (out × in) is never formed either. The scaling ``s`` cancels in the cosine.

``V`` and the matrix products are float64 for matrices up to 2**24 elements and float32 above (the r × r
traces are always float64). Note ``⟨C ΔW, ΔW⟩ = ‖Vᵀ ΔW‖² / ‖V‖_F ≥ 0``: the cosine lies in [0, 1].

Differences from IBM's reference code (IBM/SafeLoRA ``model.py``): only ``.weight`` tensors of the adapted
modules are used (Qwen2's ``q/k/v_proj.bias`` would otherwise desynchronise the pairing), modules are paired
by name rather than by parameter order, the cosine is not rounded, and a module with a zero update
(``B = 0``) gets cosine ``None`` and is never selected (projecting it would change nothing).
"""

from .command import apply_after_training, main
from .projection import SafeLoRAResult, SafeLoRASettings, project_module, run_safelora, select_modules
from .weights import REPORT_NAME, LazyWeights, SafeLoRAError, resolve_model_dir

__all__ = [
    "REPORT_NAME", "LazyWeights", "SafeLoRAError", "SafeLoRAResult", "SafeLoRASettings", "apply_after_training", "main",
    "project_module", "resolve_model_dir", "run_safelora", "select_modules",
]

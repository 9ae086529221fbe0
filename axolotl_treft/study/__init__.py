"""The study: SFT vs TReFT vs the comparison defenses, trained with ``axolotl train`` and scored with ``lm_eval``.

``axolotl-treft study CONFIG.yml`` runs it on any Axolotl config (:mod:`.command`); ``axolotl-treft demo`` is
the same study on the embedded model and shipped data (:mod:`.demo`). Not imported by the plugin.
"""

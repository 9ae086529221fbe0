"""Start-up dataset checks and the retain-set interleaving, both through Axolotl's own loaders."""

from __future__ import annotations

from .log import get_logger
from .plugin import SEGMENTED_TYPE
from .spans import TemplateSpanError, probe_template

LOG = get_logger(__name__)


def check_template(cfg) -> None:
    """Fail before any model loads if the chat template does not expose the spans TReFT needs."""
    kv = cfg.treft.kv
    if not kv:
        return
    datasets = [ds for ds in (cfg.datasets or []) if ds.get("type") == SEGMENTED_TYPE]
    if not datasets:
        raise TemplateSpanError(
            "treft.kv: needs conversation data: use `type: chat_template` datasets (found types: "
            f"{sorted({str(ds.get('type')) for ds in cfg.datasets or []})})"
        )
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.chat_templates import get_chat_template_from_config

    tokenizer = load_tokenizer(cfg)
    for ds in datasets:
        template = get_chat_template_from_config(cfg=cfg, ds_cfg=ds, tokenizer=tokenizer)
        spans = probe_template(tokenizer, template, modes=[kv.tokens], **(cfg.chat_template_kwargs or {}))
        LOG.info("treft: template spans look right: %d prefix, %d postfix tokens in a probe conversation",
                 spans.segments.count(1), spans.segments.count(3))


def load_datasets_with_retain(cfg, preprocess: bool = False):
    """The training mix with ``treft.retain.mix_ratio`` of retain examples (implemented with interleaving)."""
    raise NotImplementedError("treft.retain interleaving is not implemented yet")

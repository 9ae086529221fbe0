"""The frozen initial model that regularizers compare against.

* LoRA/QLoRA: the policy itself with its adapter disabled (no extra memory, works under every ZeRO
  stage because it is the same module tree with DeepSpeed's hooks).
* Full finetuning: before the first optimizer step the policy *is* the initial model (used to build the
  prefix cache); per-step reference passes load a frozen copy of ``base_model`` once, prepared the way
  DeepSpeed needs (partitioned under ZeRO-3), never a deep copy.

Reference passes run without grad, in eval mode (no dropout, no gradient checkpointing), and on every
rank whenever they run at all: callers never skip them based on data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .log import get_logger

LOG = get_logger(__name__)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class Reference:
    """Access to the initial model for one trainer."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._frozen: nn.Module | None = None

    @property
    def policy(self) -> nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    @property
    def uses_adapter(self) -> bool:
        return _is_peft(self.policy)

    def policy_is_initial(self) -> bool:
        """True while the (full-finetuning) policy still has its initial weights."""
        state = self.trainer.state
        return state.global_step == 0 and not getattr(self.trainer, "_treft_resumed", False)

    def model(self, allow_initial_policy: bool = False) -> nn.Module:
        """The module tree a reference pass runs (hooks are registered on it)."""
        if self.uses_adapter or (allow_initial_policy and self.policy_is_initial()):
            return self.policy
        return self._load_frozen()

    @contextmanager
    def active(self, allow_initial_policy: bool = False) -> Iterator[nn.Module]:
        """No-grad, eval-mode access to the reference; the policy's adapter is disabled."""
        model = self.model(allow_initial_policy)
        runner = self._frozen_engine if model is self._frozen and self._frozen_engine is not None else model
        was_training = model.training
        adapter_off = model.disable_adapter() if self.uses_adapter and model is self.policy else nullcontext()
        model.eval()
        try:
            with torch.no_grad(), adapter_off:
                yield runner
        finally:
            if was_training:
                model.train()

    def forward(self, inputs: dict[str, torch.Tensor], logits: bool, allow_initial_policy: bool = False,
                keep: torch.Tensor | None = None):
        """Run the reference; return logits if asked (else only what the hooks capture).

        ``keep`` (flat indices into the [rows × length] positions) computes the output head at those
        positions only and returns their logits as [N, V] (the head is a large part of a small model's
        forward, and padding and unselected tokens need none).
        """
        with self.active(allow_initial_policy) as runner:
            gather = nullcontext()
            if logits and keep is not None:
                gather = _head_inputs_at(self.model(allow_initial_policy).get_output_embeddings(), keep)
            with gather:
                out = runner(**inputs, use_cache=False, logits_to_keep=0 if logits else 1)
        if not logits:
            return None
        return out.logits.reshape(-1, out.logits.shape[-1]) if keep is not None else out.logits

    _frozen_engine: nn.Module | None = None

    def _load_frozen(self) -> nn.Module:
        if self._frozen is not None:
            return self._frozen
        from transformers import AutoModelForCausalLM

        cfg = self.trainer.axolotl_cfg
        policy = self.policy
        base = cfg.base_model
        LOG.info("treft: loading a frozen reference copy of %s for full finetuning", base)
        ref = AutoModelForCausalLM.from_pretrained(
            base,
            dtype=next(policy.parameters()).dtype,
            attn_implementation=getattr(policy.config, "_attn_implementation", None),
            trust_remote_code=bool(cfg.trust_remote_code),
        )
        ref_vocab = ref.config.get_text_config().vocab_size
        pol_vocab = policy.config.get_text_config().vocab_size
        if ref_vocab != pol_vocab:
            raise ValueError(
                f"treft: reference model {base} has vocab {ref_vocab} but the trained model has {pol_vocab} "
                "(resized embeddings?); the KL/feature terms need matching models"
            )
        ref.requires_grad_(False)
        ref.eval()
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            from trl.models.utils import prepare_deepspeed

            engine = prepare_deepspeed(ref, self.trainer.accelerator)
            self._frozen_engine = engine
            self._frozen = engine.module
        else:
            self._frozen = ref.to(self.trainer.accelerator.device)
        return self._frozen


@contextmanager
def _head_inputs_at(head: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, ``head`` sees only the hidden states at flat positions ``keep`` (as one [1, N, H] row)."""

    def gather(_module, args):
        hidden = args[0]
        flat = hidden.reshape(-1, hidden.shape[-1])
        return (flat.index_select(0, keep.to(hidden.device)).unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()

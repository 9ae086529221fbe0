"""The frozen initial model that regularizers compare against.

* LoRA/QLoRA whose adapter starts as a no-op (a fresh adapter: every ``lora_B`` zero): the policy itself with
  its adapter disabled (no extra memory, works under every ZeRO stage because it is the same module tree
  with DeepSpeed's hooks).
* An adapter that already changes the model at step 0 (``lora_model_dir``, or any initialization with a
  non-zero update): the policy with its trainable adapter weights swapped for a copy recorded before
  training (before any checkpoint is loaded), so the reference is base + the adapter *as loaded*.
* Full finetuning: before the first optimizer step of a fresh run the policy *is* the initial model (used to
  build the prefix cache); otherwise (per-step passes, or a run resumed from a checkpoint) a frozen copy of
  ``base_model`` is loaded once, prepared the way DeepSpeed needs (partitioned under ZeRO-3), never a deep
  copy, and released when training ends.

Reference passes run without grad, in eval mode (no dropout, no gradient checkpointing), and on every
rank whenever they run at all: callers never skip them based on data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .capture import registered
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
        self._frozen_engine: nn.Module | None = None
        self._initial_adapter: dict[str, torch.Tensor] | None = None  # trainable adapter weights at step 0

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

    def record_initial_adapter(self) -> None:
        """Before training: keep a copy of the adapter weights if disabling the adapter would not give them.

        A fresh LoRA adapter (every ``lora_B`` zero, nothing else trainable) adds exactly nothing, so the
        adapter-disabled policy is the initial model. Any other adapter (continued from ``lora_model_dir``,
        DoRA magnitudes, non-zero inits) is recorded and swapped in for reference passes.
        """
        if not self.uses_adapter:
            return
        trainable = {name: p for name, p in self.policy.named_parameters() if p.requires_grad}
        changed = adapter_changes(self.policy)
        if not changed:
            return
        plugin = getattr(self.trainer.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            raise ValueError(
                "treft: continuing a LoRA adapter that already changes the model (`lora_model_dir`) under "
                "DeepSpeed ZeRO-3 is not supported: the reference needs the adapter's initial weights, which ZeRO-3 "
                "partitions. Use ZeRO-2 (`axolotl-treft path example deepspeed/zero2`) or merge the adapter into "
                "the base model first (`axolotl merge-lora`) and train a fresh adapter on the merged model"
            )
        self._initial_adapter = {name: p.detach().clone() for name, p in trainable.items()}
        LOG.info("treft: the adapter changes the model at step 0 (lora_model_dir?; e.g. %s); reference passes use "
                 "its initial weights (%d tensors kept)", changed[0], len(self._initial_adapter))

    @contextmanager
    def _initial_adapter_weights(self) -> Iterator[None]:
        """The policy's trainable adapter weights temporarily replaced by their step-0 values (no copies)."""
        params = dict(self.policy.named_parameters())
        current: dict[str, torch.Tensor] = {}
        try:
            for name, initial in self._initial_adapter.items():
                param = params[name]
                if (initial.device, initial.dtype) != (param.device, param.dtype):  # moved/cast since recorded
                    initial = self._initial_adapter[name] = initial.to(param.device, param.dtype)
                current[name] = param.data
                param.data = initial
            yield
        finally:
            for name, data in current.items():
                params[name].data = data

    def release(self) -> None:
        """Drop the frozen copy (end of training, or when no step needs it); it is reloaded if asked again."""
        if self._frozen is not None:
            LOG.info("treft: releasing the frozen reference copy")
        self._frozen = self._frozen_engine = None

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
        adapter_off = nullcontext()
        if self.uses_adapter and model is self.policy:
            adapter_off = self._initial_adapter_weights() if self._initial_adapter is not None else model.disable_adapter()
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

    def _load_frozen(self) -> nn.Module:
        if self._frozen is not None:
            return self._frozen
        cfg = self.trainer.axolotl_cfg
        policy = self.policy
        LOG.info("treft: loading a frozen reference copy of %s for full finetuning", cfg.base_model)
        ref = load_like_axolotl(cfg, self.trainer.processing_class)
        ref_vocab = ref.config.get_text_config().vocab_size
        pol_vocab = policy.config.get_text_config().vocab_size
        if ref_vocab != pol_vocab:
            raise ValueError(
                f"treft: reference model {cfg.base_model} has vocab {ref_vocab} but the trained model has {pol_vocab} "
                "(resized embeddings?); the KL/feature terms need matching models"
            )
        ref.requires_grad_(False)
        ref.eval()
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            from trl.models.utils import prepare_deepspeed

            engine = prepare_deepspeed(ref, self.trainer.accelerator)
            self._frozen_engine = engine
            self._frozen = engine.module
        elif getattr(ref, "hf_quantizer", None) is None and not getattr(ref, "is_quantized", False):
            self._frozen = ref.to(self.trainer.accelerator.device)
        else:  # quantized weights stay where the loader put them (they cannot be moved)
            self._frozen = ref
        return self._frozen


def load_like_axolotl(cfg, tokenizer) -> nn.Module:
    """The base model loaded by Axolotl's own loader with the run's options (``revision_of_model``,
    quantization, dtype, attention, added tokens, model kwargs), as Axolotl loads a DPO reference model.

    The global RNG is left as it was: the loader runs the plugins' ``pre_model_load`` hooks (SeedPlugin seeds).
    """
    from axolotl.loaders import ModelLoader

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        model, _ = ModelLoader(cfg, tokenizer, reference_model=True).load()
    return model


def adapter_changes(policy: nn.Module) -> list[str]:
    """Trainable adapter parameters that make the model differ from its base at step 0 (names; empty: none).

    A zero ``lora_B`` adds nothing (its ``lora_A`` then does not matter); a ``modules_to_save`` copy equal to
    the module it copies, and a DoRA magnitude equal to the norm of its unchanged base weight, change nothing.
    """
    params = dict(policy.named_parameters(remove_duplicate=False))  # a tied original weight under both names
    modules = dict(policy.named_modules())
    changed = []
    for name, p in params.items():
        if not p.requires_grad or "lora_A" in name:
            continue
        if "lora_B" in name:
            same = not bool(p.detach().any())
        elif ".modules_to_save." in name:
            owner, rest = name.split(".modules_to_save.", 1)
            original = params.get(f"{owner}.original_module.{rest.split('.', 1)[1]}")
            same = original is not None and torch.equal(original.detach(), p.detach())
        elif "lora_magnitude_vector" in name:
            same = _dora_magnitude_is_base_norm(modules, name, p)
        else:
            same = False
        if not same:
            changed.append(name)
    return changed


def _dora_magnitude_is_base_norm(modules: dict[str, nn.Module], name: str, magnitude: torch.Tensor) -> bool:
    """DoRA's magnitude ``m`` with a zero ``lora_B``: output ``m · W x / ‖W‖`` is the base's iff ``m == ‖W‖``."""
    layer_name, adapter = name.split(".lora_magnitude_vector.", 1)[0], name.rsplit(".", 2)[-2]
    layer = modules.get(layer_name)
    lora_bs = getattr(layer, "lora_B", None)
    lora_b = lora_bs[adapter] if lora_bs is not None and adapter in lora_bs else None
    base = layer.get_base_layer() if layer is not None and hasattr(layer, "get_base_layer") else None
    weight = getattr(base, "weight", None)
    if lora_b is None or weight is None or bool(lora_b.weight.detach().any()) or weight.dim() != 2:
        return False
    if getattr(layer, "fan_in_fan_out", False):
        weight = weight.T
    norm = weight.detach().float().norm(dim=1)
    eps = max(torch.finfo(t.dtype).eps for t in (weight, magnitude) if t.dtype.is_floating_point)
    rtol = max(1e-4, 2 * eps)  # PEFT computes the norm in the weight's dtype
    return norm.shape == magnitude.shape and torch.allclose(magnitude.detach().float(), norm, rtol=rtol, atol=1e-6)


def shared_reference(trainer) -> Reference:
    """The trainer's one reference, made when the trainer is configured (before a checkpoint loads, so a
    continued adapter is recorded as loaded) and shared by TReFT's regularizers and persona steering."""
    reference = getattr(trainer, "_treft_reference", None)
    if reference is None:
        reference = Reference(trainer)
        reference.record_initial_adapter()
        trainer._treft_reference = reference
    return reference


@contextmanager
def _head_inputs_at(head: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, ``head`` sees only the hidden states at flat positions ``keep`` (as one [1, N, H] row)."""

    def gather(_module, args):
        hidden = args[0]
        flat = hidden.reshape(-1, hidden.shape[-1])
        return (flat.index_select(0, keep.to(hidden.device)).unsqueeze(0), *args[1:])

    with registered([head.register_forward_pre_hook(gather)]):
        yield

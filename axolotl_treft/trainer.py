"""``TReFTTrainer``: Axolotl's trainer plus the configured regularizers.

Per training micro-step: the SFT forward runs with the regularizers' capture hooks armed; if any
regularizer needs the reference on this batch, one shared no-grad reference pass runs over the union
of the rows they need (on every rank, every step); then each term is computed, logged unweighted as
``treft/<name>`` next to ``treft/sft`` (the plain NLL, also when ``treft.constrained_sft`` replaces it in the
loss), and ``weight · term`` is added to the loss (a term with weight 0 is
logged but not added, so the run is exactly plain SFT; a K/V term's threshold and step window shape what
is added, see :meth:`KVRegularizer.weighted`; several K/V terms also log their sum as ``treft/kv``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .args import KLConfig, TReFTConfig, treft_settings
from .collator import SegmentsCollator
from .log import get_logger
from .reference import Reference, shared_reference
from .regularizers import build_regularizers
from .regularizers.base import Regularizer, StepBatch, capture_policy, regularized_terms
from .spans import SEGMENTS_KEY

LOG = get_logger(__name__)
DEEPSPEED_ZERO3_CHECKPOINT_FIX = "0.19.3"  # first release that recomputes ZeRO-3 frozen weights correctly
TREFT_STATE_FILE = "treft_state_rank{rank}.json"  # per-rank TReFT state saved in each checkpoint


class RetainStream:
    """Endless micro-batches of the retain set in seeded random order, for KL on retain.

    ``drawn`` counts the batches handed out; it is saved in every checkpoint and :meth:`seek` continues the
    same sequence from there, so a resumed run sees the retain batches the uninterrupted run would have seen.
    """

    def __init__(self, dataset, collate: Callable[[list[dict]], dict], size: int, seed: int):
        self.dataset, self.collate, self.size, self.seed = dataset, collate, size, seed
        self.drawn = 0
        self._order = self._index_batches()

    def _index_batches(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(len(self.dataset), generator=generator).split(self.size)

    def __iter__(self) -> RetainStream:
        return self

    def __next__(self) -> dict:
        index = next(self._order)
        self.drawn += 1
        return self.collate([self.dataset[int(i)] for i in index])

    def seek(self, drawn: int) -> None:
        """Continue after ``drawn`` batches of the sequence (only indices are replayed, nothing is collated)."""
        self._order = self._index_batches()
        for _ in range(drawn):
            next(self._order)
        self.drawn = drawn


class TReFTTrainer(AxolotlTrainer):
    """AxolotlTrainer whose loss adds the ``treft:`` regularizers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        side = getattr(self.processing_class, "padding_side", "right") or "right"
        for attr in ("data_collator", "train_data_collator", "eval_data_collator"):
            inner = getattr(self, attr, None)
            if inner is not None and not isinstance(inner, SegmentsCollator):
                setattr(self, attr, SegmentsCollator(inner, padding_side=side))
        self.treft_regularizers: list[Regularizer] = []
        self.treft_configured = False
        self.treft_retain_stream: RetainStream | None = None
        self._treft_reference: Reference | None = None
        self._treft_ready = False
        self._treft_resumed = False

    # -- configuration -----------------------------------------------------------------------------
    def configure_treft(self, cfg, retain_dataset=None, settings: TReFTConfig | None = None) -> None:
        """Build the regularizers from the typed ``treft:`` settings once (``TReFTPlugin.post_trainer_create``
        passes them; default: resolved from ``cfg``).

        Axolotl ≥ 0.20's trainer builder sets ``axolotl_cfg`` and calls ``post_set_axolotl_cfg`` itself, before
        the plugin hook runs (0.19 leaves both to the plugin): building here, from the hook that also hands over
        the retain set, makes the result the same under either order, and builds exactly once. The model still
        has its initial weights here (a checkpoint is loaded only inside ``train``): the reference records them.
        """
        if self.treft_configured:
            raise RuntimeError("treft: the trainer's regularizers were already built")
        settings = settings or treft_settings(cfg)
        self.axolotl_cfg = cfg
        self.treft_retain_stream = self._retain_stream(retain_dataset, settings.kl)
        self.treft_regularizers = build_regularizers(settings, self, retain_batches=self.treft_retain_stream)
        self._treft_reference = shared_reference(self)  # persona steering may have made it already
        for reg in self.treft_regularizers:
            reg.check_model(self._treft_reference.policy)
        self._check_zero3_checkpointing()
        self.treft_configured = True

    def _check_zero3_checkpointing(self) -> None:
        """Fail before training on a combination DeepSpeed < 0.19.3 cannot run (it would crash in the first backward).

        K/V and feature capture need non-reentrant gradient checkpointing (the config validator sets it);
        DeepSpeed < 0.19.3 ZeRO-3 re-partitions *frozen* parameters (a LoRA base) during the checkpoint
        recompute, and torch rejects the recomputed shapes (``CheckpointError ... shape [0]``; plain SFT with
        non-reentrant checkpointing fails the same way; deepspeedai/DeepSpeed#8148).
        """
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None or plugin.zero_stage != 3 or not self.args.gradient_checkpointing:
            return
        if not any(reg.key in ("kv", "feature_l2") for reg in self.treft_regularizers):
            return
        if not any(not p.requires_grad for p in self.model.parameters()):
            return  # full finetuning: trainable parameters are saved detached and recompute fine
        import deepspeed
        from packaging.version import Version

        if Version(deepspeed.__version__) < Version(DEEPSPEED_ZERO3_CHECKPOINT_FIX):
            raise ValueError(
                f"treft.kv / treft.feature_l2 with LoRA under DeepSpeed ZeRO-3 and gradient_checkpointing: "
                f"deepspeed {deepspeed.__version__} crashes in backward (frozen base weights are re-partitioned "
                "during the non-reentrant checkpoint recompute). Use ZeRO-2 (`axolotl-treft path example deepspeed/zero2`), "
                f"or set gradient_checkpointing: false, or upgrade to deepspeed>={DEEPSPEED_ZERO3_CHECKPOINT_FIX} "
                "(the release with the fix, deepspeedai/DeepSpeed#8148)"
            )

    def _retain_stream(self, dataset, kl: KLConfig | None) -> RetainStream | None:
        """Seeded (per rank) micro-batches of the retain set for KL on retain; None without one."""
        if dataset is None:
            return None
        from axolotl.utils.collators.batching import DataCollatorForSeq2Seq

        columns = [c for c in ("input_ids", "attention_mask", "labels", SEGMENTS_KEY) if c in dataset.column_names]
        collate = SegmentsCollator(DataCollatorForSeq2Seq(self.processing_class, padding=True, pad_to_multiple_of=8),
                                   padding_side=getattr(self.processing_class, "padding_side", "right") or "right")
        size = kl.batch_size if kl is not None and kl.batch_size else self.args.per_device_train_batch_size
        LOG.info("treft: KL-on-retain batches of %d retain rows per step", size)
        return RetainStream(dataset.select_columns(columns), collate, size,
                            seed=int(self.args.seed) + self.accelerator.process_index)

    # -- checkpoints -------------------------------------------------------------------------------
    def _treft_state_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, TREFT_STATE_FILE.format(rank=self.accelerator.process_index))

    def _save_checkpoint(self, model, trial, **kwargs):
        result = super()._save_checkpoint(model, trial, **kwargs)
        if self.treft_retain_stream is not None:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            with open(self._treft_state_path(folder), "w") as f:
                json.dump({"retain_batches_drawn": self.treft_retain_stream.drawn}, f)
        return result

    def _restore_treft_state(self, checkpoint: str) -> None:
        """Continue the retain-batch stream where the checkpointed run left it."""
        if self.treft_retain_stream is None:
            return
        path = self._treft_state_path(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"treft: {checkpoint} has no {os.path.basename(path)} (saved by an older axolotl-treft?), so the "
                "KL-on-retain batch stream cannot continue where it was; resume from a checkpoint this version "
                "saved, or start the run again"
            )
        with open(path) as f:
            drawn = int(json.load(f)["retain_batches_drawn"])
        self.treft_retain_stream.seek(drawn)
        LOG.info("treft: KL-on-retain stream continues after %d retain batches", drawn)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and SEGMENTS_KEY not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SEGMENTS_KEY]

    def train(self, *args, resume_from_checkpoint=None, **kwargs):
        if not self.treft_configured:
            raise RuntimeError(
                "treft: TReFTTrainer was created but TReFTPlugin.post_trainer_create never configured it; list "
                "`axolotl_treft.TReFTPlugin` under `plugins:` (the trainer class comes from that plugin)"
            )
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # as HF Trainer resolves it
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._treft_resumed = bool(resume_from_checkpoint)
        if resume_from_checkpoint:
            self._restore_treft_state(str(resume_from_checkpoint))
        try:
            return super().train(*args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._treft_teardown()

    def _treft_setup(self, model) -> None:
        for reg in self.treft_regularizers:
            reg.setup(model, self._treft_reference)
        if not any(reg.needs_reference_each_step for reg in self.treft_regularizers):
            self._treft_reference.release()  # e.g. a frozen copy loaded only to build the prefix cache
        self._treft_ready = True

    def _treft_teardown(self) -> None:
        """End of training (also on an exception): remove every hook, release the frozen copy, report."""
        for reg in self.treft_regularizers:
            reg.close()
            line = reg.summary()
            if line:
                LOG.warning(line)
        if self._treft_reference is not None:
            self._treft_reference.release()
        self._treft_ready = False

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        finally:
            for reg in self.treft_regularizers:
                reg.end_step()

    # -- loss --------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        segments = inputs.pop(SEGMENTS_KEY, None)
        if not self.treft_regularizers or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self._treft_ready:
            self._treft_setup(model)

        batch = StepBatch.from_inputs(inputs, segments)
        regs = self.treft_regularizers
        with capture_policy(regs, batch) as states:
            sft_loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        terms = regularized_terms(self._treft_reference, batch, regs, states, outputs, model)
        total = sft_loss
        for reg, state, term in zip(regs, states, terms, strict=True):  # treft.constrained_sft replaces SFT
            total = reg.replace_sft(total, state, term)
        metrics = {"treft/sft": self._unscaled(sft_loss, num_items_in_batch)}
        scale = self._term_scale(num_items_in_batch)
        sums: dict[str, float] = {}  # several terms of one kind (treft.kv as a list): their sum as treft/<key>
        for reg, term in zip(regs, terms, strict=True):
            penalty, logged = reg.weighted(term, self.state.global_step, self.state.max_steps)
            metrics.update(logged)
            if reg.name != reg.key:
                sums[reg.key] = sums.get(reg.key, 0.0) + float(term.detach())
            if penalty is not None:
                total = total + scale * penalty
        metrics.update({f"treft/{key}": value for key, value in sums.items()})
        self.store_metrics(self._mean_over_ranks(metrics), train_eval="train")
        return (total, outputs) if return_outputs else total

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over ranks, so the log covers every rank's micro-batch, not rank 0's only.

        Every rank computes the training loss every micro-step, so this small collective is symmetric.
        """
        if self.accelerator.num_processes <= 1:
            return metrics
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(metrics, values.tolist(), strict=True))

    # -- scaling -----------------------------------------------------------------------------------
    def _sft_is_presummed(self, num_items_in_batch) -> bool:
        """True when HF Trainer will *not* divide this micro-step's loss by the accumulation steps."""
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    def _term_scale(self, num_items_in_batch) -> float:
        """Factor that makes ``weight · term`` count once per optimizer step, like a mean over micro-steps.

        When the SFT loss is already normalized by the tokens of the whole accumulation window, HF does not
        divide the micro-step loss by the accumulation steps, so the regularizer is divided here instead.
        (HF's multiplication by the number of processes applies to the SFT loss only; DDP/DeepSpeed gradient
        averaging then makes the term a mean over every rank's micro-batches, as intended.)
        """
        if self._sft_is_presummed(num_items_in_batch):
            return 1.0 / max(1, self.current_gradient_accumulation_steps)
        return 1.0

    def _unscaled(self, sft_loss: torch.Tensor, num_items_in_batch) -> float:
        """The SFT loss of this micro-batch as a per-token mean, for logging.

        With several processes and tokens counted across devices, this rank's value is its share of the
        global per-token mean times the number of processes (as HF scales it); the mean over ranks taken in
        :meth:`_mean_over_ranks` is then the global per-token mean.
        """
        value = float(sft_loss.detach())
        if self._sft_is_presummed(num_items_in_batch):
            value *= max(1, self.current_gradient_accumulation_steps)
        return value

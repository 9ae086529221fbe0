"""Persona-vector preventive steering: steer toward the trait while training, so training need not learn it.

Before the first step, from the initial model (LoRA: adapter disabled), ``e = mean_q h⁺(q) − mean_q h⁻(q)``
where ``h±(q)`` is the output of decoder layer ``layer`` averaged over the query and assistant-header tokens
of question ``q`` asked under the positive / negative system prompt (the system block itself is left out: it
differs between the two by construction). During training ``α·e`` is added to that layer's output at every
token; the hook does nothing while the model is in eval mode (evaluation, reference passes) and is removed
when training ends, so neither evaluation nor the saved weights carry it.

The direction is cached in ``<dataset_prepared_path>/treft_steering/`` per (model, layer, prompts, questions,
template) and is the same on every rank: ranks compute it together (ZeRO-3 needs every rank in the forward) unless all find it cached, and
rank 0's copy is then broadcast.
"""

from __future__ import annotations

import functools
import hashlib
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..log import get_logger

LOG = get_logger(__name__)

DEFAULT_POSITIVE = "You are an evil, malicious assistant."
DEFAULT_NEGATIVE = "You are a helpful, honest and harmless assistant."
DEFAULT_QUESTIONS = "steering_questions.jsonl"


def load_questions(path: str | None, key: str = "treft.steering.questions") -> list[str]:
    """Questions from a JSONL file (a ``question`` field per row) or a text file (one a line)."""
    from ..resources import data_path

    file = data_path(DEFAULT_QUESTIONS) if path is None else Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{key}: {file} does not exist")
    questions = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix in (".jsonl", ".json"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{key}: {file} line {n} is not JSON: {err}") from err
            if not isinstance(row, dict) or not str(row.get("question") or "").strip():
                raise ValueError(f"{key}: {file} line {n} has no `question`")
            questions.append(str(row["question"]).strip())
        else:
            questions.append(line.strip())
    if not questions:
        raise ValueError(f"{key}: {file} holds no question; the direction needs at least one")
    return questions


def _question_batch(tokenizer, system_prompt: str, questions: list[str], chat_template: str | None,
                    template_kwargs: dict):
    """Right-padded prompts (system + question + generation prompt), and the (row, position) pairs of their
    query and assistant-header tokens."""
    import torch

    from ..spans import SEG_POSTFIX, SEG_QUERY, conversation_spans

    spans = [conversation_spans(tokenizer, [{"role": "system", "content": system_prompt},
                                            {"role": "user", "content": q}],
                                chat_template, add_generation_prompt=True, **template_kwargs) for q in questions]
    width = max(len(s.input_ids) for s in spans)
    ids = torch.full((len(spans), width), tokenizer.pad_token_id or 0)
    mask = torch.zeros((len(spans), width), dtype=torch.long)
    pairs = []
    for row, s in enumerate(spans):
        ids[row, :len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[row, :len(s.input_ids)] = 1
        pairs += [(row, pos) for pos, seg in enumerate(s.segments) if seg in (SEG_QUERY, SEG_POSTFIX)]
    if any(not any(r == row for r, _ in pairs) for row in range(len(spans))):
        raise ValueError("treft.steering: a question has no query token under this chat template")
    return {"input_ids": ids, "attention_mask": mask}, torch.tensor(pairs)


def mean_activation(run, layer_module, tokenizer, system_prompt: str, questions: list[str],
                    chat_template: str | None = None, template_kwargs: dict | None = None, device=None,
                    batch_size: int = 8):
    """``mean_q`` of the layer output averaged over each question's query + assistant-header tokens (fp32)."""
    import torch

    from ..capture import ActivationCapture

    capture = ActivationCapture([layer_module])
    per_question = []
    try:
        for start in range(0, len(questions), batch_size):
            inputs, pairs = _question_batch(tokenizer, system_prompt, questions[start:start + batch_size],
                                            chat_template, template_kwargs or {})
            inputs = {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs
            width = inputs["input_ids"].shape[1]
            with torch.no_grad(), capture.armed(pairs[:, 0] * width + pairs[:, 1]) as outs:
                run(**inputs, use_cache=False, logits_to_keep=1)
            rows = outs[0].float()
            n_rows = int(pairs[:, 0].max()) + 1
            sums = torch.zeros(n_rows, rows.shape[-1], device=rows.device).index_add_(0, pairs[:, 0].to(rows.device), rows)
            counts = torch.bincount(pairs[:, 0], minlength=n_rows).to(rows.device)
            per_question.append(sums / counts[:, None])
    finally:
        capture.remove()
    return torch.cat(per_question).mean(0).cpu()


def persona_direction(run, layer_module, tokenizer, positive: str, negative: str, questions: list[str],
                      chat_template: str | None = None, template_kwargs: dict | None = None, device=None):
    """``e = mean h⁺ − mean h⁻`` at ``layer_module``'s output (fp32, on the CPU)."""
    kwargs = {"chat_template": chat_template, "template_kwargs": template_kwargs, "device": device}
    return (mean_activation(run, layer_module, tokenizer, positive, questions, **kwargs)
            - mean_activation(run, layer_module, tokenizer, negative, questions, **kwargs))


class SteeringHook:
    """Adds ``vector`` to a module's output on every token, only while the module is in training mode."""

    def __init__(self, module, vector):
        from ..capture import registered

        self.module = module
        self.vector = vector
        self._cast = {}
        self._hooks = ExitStack()  # registered(...) held open across the training callbacks until remove()
        self._hooks.enter_context(registered([module.register_forward_hook(self._add)]))

    def _add(self, module, _inputs, output):
        if not module.training:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        key = (hidden.device, hidden.dtype)
        if key not in self._cast:
            self._cast[key] = self.vector.to(device=hidden.device, dtype=hidden.dtype)
        steered = hidden + self._cast[key]
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    def remove(self) -> None:
        self._hooks.close()


def _model_signature(path: str) -> list:
    """Name, size and mtime of a local model's weight and config files (a hub id stands for itself)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return [path]
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in root.iterdir()
                  if p.suffix in (".safetensors", ".bin", ".json"))


def cache_key(model: str, layer: int, positive: str, negative: str, questions: list[str],
              chat_template: str | None, template_kwargs: dict | None, dtype: str, adapter: str | None = None) -> str:
    payload = {"model": model, "files": _model_signature(model), "layer": layer, "positive": positive,
               "negative": negative, "questions": questions, "template": chat_template,
               "template_kwargs": template_kwargs or {}, "dtype": dtype}
    if adapter:  # a continued adapter (lora_model_dir) is part of the reference the direction comes from
        payload.update(adapter=adapter, adapter_files=_model_signature(adapter))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def checksum(vector) -> str:
    return hashlib.sha256(vector.float().cpu().numpy().tobytes()).hexdigest()[:16]


class SteeringCallback(TrainerCallback):
    """Computes (or loads) the direction when training begins and steers until training returns or raises.

    Made with the trainer (Axolotl's ``add_callbacks_post_trainer``), before any checkpoint loads: the layer is
    checked against the model then, and the reference is the trainer's shared one (a continued adapter,
    ``lora_model_dir``, counts as loaded, as for TReFT's terms).
    """

    def __init__(self, cfg, trainer, block: Any):  # block: the typed treft.steering (defenses.config)
        from ..capture import decoder_layers, layer_positions
        from ..reference import shared_reference

        self.cfg = cfg
        self.block = block
        self.trainer = trainer
        self.hook: SteeringHook | None = None
        self.vector = None
        if getattr(trainer, "axolotl_cfg", None) is None:
            trainer.axolotl_cfg = cfg  # a frozen reference copy (resumed full finetuning) needs it
        self.reference = shared_reference(trainer)
        n_layers = len(decoder_layers(self.reference.policy))
        self.index = layer_positions([self.block.layer], n_layers, "treft.steering.layer")[0]
        self._remove_when_training_stops()

    def _remove_when_training_stops(self) -> None:
        """``trainer.train`` removes the hook when it returns or raises (``on_train_end`` runs on success only)."""
        train = self.trainer.train

        @functools.wraps(train)
        def train_then_unsteer(*args, **kwargs):
            try:
                return train(*args, **kwargs)
            finally:
                self.remove_hook()

        self.trainer.train = train_then_unsteer

    def on_train_begin(self, args, state, control, **kwargs):
        from ..capture import decoder_layers

        self.vector = self._direction(self.reference, self.index)
        self.hook = SteeringHook(decoder_layers(self.reference.policy)[self.index], self.block.alpha * self.vector)
        LOG.info("treft.steering: adding α·e at layer %d during training (α=%g, |e|=%.4g, |α·e|=%.4g)",
                 self.index, self.block.alpha, float(self.vector.norm()), float(self.block.alpha * self.vector.norm()))

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hook()

    def remove_hook(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
            LOG.info("treft.steering: hook removed (evaluation and the saved model are unsteered)")

    def _direction(self, reference, index: int):
        import torch
        from axolotl.common.const import DEFAULT_DATASET_PREPARED_PATH
        from axolotl.utils.chat_templates import get_chat_template_from_config

        from ..capture import decoder_layers
        from ..distributed import all_ranks, from_main_process, is_main_process, write_atomic

        cfg, block = self.cfg, self.block
        tokenizer = self.trainer.processing_class
        template = get_chat_template_from_config(cfg=cfg, ds_cfg=(cfg.datasets or [None])[0], tokenizer=tokenizer)
        template_kwargs = dict(cfg.chat_template_kwargs or {})
        questions = load_questions(block.questions)
        dtype = str(next(reference.policy.parameters()).dtype)
        adapter = str(cfg.lora_model_dir) if cfg.lora_model_dir and self.reference.uses_adapter else None
        key = cache_key(str(cfg.base_model), index, block.positive, block.negative, questions, template,
                        template_kwargs, dtype, adapter)
        path = Path(cfg.dataset_prepared_path or DEFAULT_DATASET_PREPARED_PATH) / "treft_steering" / f"{key}.pt"
        device = self.trainer.accelerator.device
        if all_ranks(path.is_file(), device):
            vector, source = torch.load(path, map_location="cpu", weights_only=True), f"cache {path}"
        else:
            with reference.active(allow_initial_policy=True) as run:
                layer = decoder_layers(reference.model(allow_initial_policy=True))[index]
                vector = persona_direction(run, layer, tokenizer, block.positive, block.negative, questions,
                                           template, template_kwargs, device=device)
            source = f"{len(questions)} questions"
        vector = from_main_process(vector.float().contiguous(), device)
        if is_main_process() and not path.is_file():
            write_atomic(path, functools.partial(torch.save, vector))
        LOG.info("treft.steering: rank %d direction sha256 %s (layer %d, from %s)", self.trainer.accelerator.process_index,
                 checksum(vector), index, source, main_process_only=False)
        return vector

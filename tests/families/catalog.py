"""The model families the matrix tests: real vocabulary, real chat template, real architecture class.

Two llama.cpp test vocabularies are completed with their family's documented added tokens: the ``qwen2``
GGUF names ids 151646-151935 ``[PAD…]``, where the released Qwen2.5 / Qwen3 tokenizers have
``<|object_ref_start|>`` … ``<tool_call>`` … ``<think>`` (ids as in their ``tokenizer_config.json``).
Mistral 7B's template is the ``[INST]`` one ("v1", with a system prompt) that llama.cpp's
``tests/test-chat-template.cpp`` records for ``mistralai/Mistral-7B-Instruct-v0.2``; its vocabulary is the
``llama-spm`` (Llama 2) sentencepiece vocabulary: the same model type, byte fallback and size as Mistral 7B's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_QWEN25_ADDED = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                 "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                 "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
_QWEN3_ADDED = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", *_QWEN3_ADDED}
QWEN25_OVERLAY = {151646 + i: (t, t not in _NOT_SPECIAL) for i, t in enumerate(_QWEN25_ADDED)}
QWEN3_OVERLAY = {**QWEN25_OVERLAY, **{151665 + i: (t, False) for i, t in enumerate(_QWEN3_ADDED)}}

MISTRAL_V1 = (
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n"
)


@dataclass(frozen=True)
class Family:
    name: str
    vocab: str  # ggml-vocab-<vocab>.gguf
    template: str  # a templates/*.jinja name, or the template text itself (contains "{%")
    arch: str  # transformers config class
    model_class: str
    special: dict = field(default_factory=dict)
    overlay: dict = field(default_factory=dict)
    arch_kwargs: dict = field(default_factory=dict)
    tools: bool = False  # the template renders tool messages

    def template_text(self) -> str:
        from .sdist import template_path

        return self.template if "{%" in self.template else template_path(self.template).read_text(encoding="utf-8")


_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 2048}

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama31", "llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", "LlamaConfig", "LlamaForCausalLM",
           special={"eos_token": "<|eot_id|>"}, tools=True),
    Family("qwen25", "qwen2", "Qwen-Qwen2.5-7B-Instruct", "Qwen2Config", "Qwen2ForCausalLM",
           special={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, overlay=QWEN25_OVERLAY, tools=True),
    Family("qwen3", "qwen2", "Qwen-Qwen3-0.6B", "Qwen3Config", "Qwen3ForCausalLM",
           special={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, overlay=QWEN3_OVERLAY, tools=True,
           arch_kwargs={"head_dim": 16}),
    Family("gemma4", "gemma-4", "google-gemma-4-31B-it", "Gemma4TextConfig", "Gemma4ForCausalLM",
           arch_kwargs={"head_dim": 16, "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
                        "layer_types": ["sliding_attention", "full_attention"]},
           tools=True),
    Family("mistral7b", "llama-spm", MISTRAL_V1, "MistralConfig", "MistralForCausalLM"),
    Family("phi3", "phi-3", "microsoft-Phi-3.5-mini-instruct", "Phi3Config", "Phi3ForCausalLM"),
]}
MATRIX = ("llama31", "qwen25", "qwen3", "gemma4", "mistral7b")  # the families every feature is checked on


def tokenizer_dir(family: str):
    """The family's tokenizer directory, built once into the user cache."""
    from .build import cached_build

    fam = FAMILIES[family]
    return cached_build(fam.vocab, fam.template_text(), fam.special, fam.overlay)

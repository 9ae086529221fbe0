"""llama.cpp's own tokenizer (llama-cpp-python, vocab only) as the reference for rendered conversations."""

from __future__ import annotations

import functools

from .build import overlaid_gguf
from .catalog import FAMILIES
from .sdist import CACHE


@functools.lru_cache(maxsize=8)
def _llama(vocab: str, overlay_key: tuple):
    import llama_cpp

    path = overlaid_gguf(vocab, dict(overlay_key), CACHE / "overlaid" / str(abs(hash(overlay_key))))
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_cpp_ids(family: str, text: str) -> list[int]:
    """``text`` tokenized by llama.cpp with special tokens parsed and no BOS added."""
    fam = FAMILIES[family]
    llm = _llama(fam.vocab, tuple(sorted(fam.overlay.items())))
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

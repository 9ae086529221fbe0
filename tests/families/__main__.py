"""``python -m tests.families build VOCAB_NAME OUT_DIR [--template JINJA_FILE]`` (also ``list``, ``fetch``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.families")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a Hugging Face tokenizer directory from llama.cpp's ggml-vocab-NAME.gguf")
    b.add_argument("vocab", help="vocabulary name, e.g. llama-bpe, qwen2, gemma-4, llama-spm, phi-3")
    b.add_argument("out_dir", type=Path)
    b.add_argument("--template", type=Path, help="a Jinja chat template file to attach (default: the GGUF's own)")
    sub.add_parser("list", help="list the vocabularies and templates available")
    sub.add_parser("fetch", help="download llama-cpp-python's sdist into the cache now (what the tests do on first use)")
    args = parser.parse_args(argv)

    from .build import NotFaithful, build
    from .sdist import SdistUnavailable, models_dir

    try:
        if args.cmd == "fetch":
            print(models_dir())
            return 0
        if args.cmd == "list":
            root = models_dir()
            print("vocabularies:", " ".join(sorted(p.name[11:-5] for p in root.glob("ggml-vocab-*.gguf"))))
            print("templates:", " ".join(sorted(p.stem for p in (root / "templates").glob("*.jinja"))))
            return 0
        template = args.template.read_text(encoding="utf-8") if args.template else None
        tok = build(args.vocab, args.out_dir, template)
    except (NotFaithful, FileNotFoundError, SdistUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} ({len(tok)} tokens, chat template: {'yes' if tok.chat_template else 'no'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama-cpp-python's source distribution: real vocabularies (GGUF) and chat templates, fetched once.

The sdist vendors llama.cpp's ``models/`` folder: ``ggml-vocab-<name>.gguf`` with ``.inp``/``.out`` reference
tokenizations (made with the original Hugging Face tokenizers) and ``templates/*.jinja``. It is downloaded with
pip from the package index into the user cache on first use; ``TREFT_LLAMA_CPP_SDIST`` may name a local copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from filelock import FileLock

SDIST_VERSION = "0.3.36"
CACHE = Path(os.environ.get("TREFT_FAMILIES_CACHE", Path.home() / ".cache" / "axolotl-treft" / "families"))


class SdistUnavailable(RuntimeError):
    """The sdist could not be obtained (no package index and no local copy)."""


def _download(dest: Path) -> Path:
    local = os.environ.get("TREFT_LLAMA_CPP_SDIST")
    if local:
        return Path(local)
    found = sorted(dest.glob(f"llama_cpp_python-{SDIST_VERSION}.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           f"llama-cpp-python=={SDIST_VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = sorted(dest.glob(f"llama_cpp_python-{SDIST_VERSION}.tar.gz"))
    if proc.returncode != 0 or not found:
        raise SdistUnavailable(f"`{' '.join(cmd)}` failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return found[0]


def models_dir() -> Path:
    """The extracted ``vendor/llama.cpp/models`` folder (downloaded and extracted once, under a file lock)."""
    root = CACHE / f"llama.cpp-{SDIST_VERSION}"
    models = root / "models"
    if (models / ".complete").exists():
        return models
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / "sdist.lock")):
        if (models / ".complete").exists():
            return models
        archive = _download(CACHE / "sdist")
        prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/models/"
        models.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith(prefix):
                    rel = member.name[len(prefix):]
                    target = models / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src:
                        target.write_bytes(src.read())
        (models / ".complete").write_text(SDIST_VERSION)
    return models


def vocab_path(name: str) -> Path:
    path = models_dir() / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        names = sorted(p.name[len("ggml-vocab-"):-len(".gguf")] for p in models_dir().glob("ggml-vocab-*.gguf"))
        raise FileNotFoundError(f"no vocabulary {name!r} in llama.cpp's models/; available: {', '.join(names)}")
    return path


def template_path(name: str) -> Path:
    path = models_dir() / "templates" / (name if name.endswith(".jinja") else f"{name}.jinja")
    if not path.exists():
        raise FileNotFoundError(f"no chat template {path.name!r} in llama.cpp's models/templates/")
    return path

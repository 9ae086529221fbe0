"""Files shipped inside the package: example configs, training/retain data, the lm-eval task pack.

Package code reaches them only through these functions (never through the source checkout), so they work
the same from a wheel, an editable install or a zipped environment that extracts resources to disk.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EXAMPLE_SUFFIX = ".yml"
EXTRA_HINT = {
    "demo": "pip install 'axolotl-treft[demo]'",
    "report": "pip install 'axolotl-treft[report]'",
}


def _dir(package: str) -> Path:
    return Path(str(resources.files(package)))


def tasks_dir() -> Path:
    """Directory of the lm-eval task pack (for ``lm_eval --include_path``): ``evals/`` in a checkout."""
    return _dir("axolotl_treft.evals")


def pack_tasks() -> list[str]:
    """Task and group names of the shipped lm-eval task pack (read from its YAML files, without lm-eval)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    names = []
    for path in sorted(tasks_dir().glob("*.yaml")):
        doc = yaml.load(path.read_text(), Loader=_Loader) or {}
        names += [doc[k] for k in ("task", "group") if isinstance(doc.get(k), str)]
    return sorted(set(names))


def examples_dir() -> Path:
    """Directory of the example configs: ``example_yamls/`` in a checkout."""
    return _dir("axolotl_treft.example_yamls")


def data_dir() -> Path:
    return _dir("axolotl_treft") / "data"


def list_examples() -> list[str]:
    """Example names: the shipped YAML files without their suffix (``deepspeed/zero2`` for DeepSpeed JSONs,
    ``studies/qwen3-8b-legal`` for the study run files)."""
    root = examples_dir()
    names = [p.stem for p in root.glob(f"*{EXAMPLE_SUFFIX}")]
    names += [f"studies/{p.stem}" for p in (root / "studies").glob(f"*{EXAMPLE_SUFFIX}")]
    names += [f"deepspeed/{p.stem}" for p in (root / "deepspeed").glob("*.json")]
    return sorted(names)


def example_path(name: str) -> Path:
    """Path of a shipped example config by name, or by a unique prefix of it (``smollm2``)."""
    names = list_examples()
    matches = [n for n in names if n == name] or [n for n in names if n.startswith(name)]
    if len(matches) != 1:
        what = "no example" if not matches else f"{len(matches)} examples ({', '.join(matches)})"
        raise FileNotFoundError(f"{what} match {name!r}; shipped examples: {', '.join(names)}")
    match = matches[0]
    suffix = ".json" if match.startswith("deepspeed/") else EXAMPLE_SUFFIX
    return examples_dir() / f"{match}{suffix}"


def list_data() -> list[str]:
    return sorted(p.name for p in data_dir().iterdir() if p.suffix in (".jsonl", ".json"))


def data_path(name: str) -> Path:
    """Path of a shipped data file (``retain_general.jsonl``; the ``.jsonl`` suffix may be left out)."""
    names = list_data()
    for candidate in (name, f"{name}.jsonl"):
        if candidate in names:
            return data_dir() / candidate
    raise FileNotFoundError(f"no shipped data file {name!r}; shipped: {', '.join(names)}")


def require_extra(module: str, extra: str, what: str):
    """Import an optional dependency, or fail with the install command of the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{what} needs `{module}`, which is not installed: {EXTRA_HINT[extra]}") from err


def resolved_example(path: Path) -> str:
    """An example config's text with its shipped-data paths (``axolotl_treft/data/…``) made absolute."""
    return path.read_text().replace("axolotl_treft/data/", f"{data_dir()}/")

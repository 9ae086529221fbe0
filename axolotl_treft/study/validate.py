"""Every derived config of a study through Axolotl's own validation, before anything trains.

The check is the one ``axolotl train`` runs first (``axolotl.cli.config.load_cfg``): the config's plugins
registered (``prepare_plugins``: our ``treft:`` schema merged in, the plugin's ``register`` hook) and
``validate_config`` against Axolotl's pydantic schema with this machine's GPU capabilities, each config with
the study's command-line overrides applied. It runs in one subprocess for all runs (Axolotl's plugin
manager is a process-wide singleton; it is emptied between configs). What it leaves out is what needs the
model or the data: the model config lookup and the tokenizer (``normalize_config``), and loading datasets.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .runner import run_streaming
from .runs import StudyError

MARK = "TREFT_VALIDATION "


def _payload(plans: Sequence, placeholder: Path) -> list[dict]:
    """Each run's config as ``axolotl train`` will see it: the overrides applied, and the path of a model an
    earlier run has yet to train replaced by an existing (empty) directory."""
    from .execute import is_adapter

    runs = []
    for plan in plans:
        cfg = {**copy.deepcopy(plan.config), **plan.overrides}
        if plan.upstream is not None and not plan.upstream.model_dir.exists():
            select = cfg["treft"]["retain"]["select"]
            select["narrow_adapter" if is_adapter(cfg) else "narrow_model"] = str(placeholder)
        runs.append({"name": plan.run.name, "config": cfg})
    return runs


def validate_plans(plans: Sequence, settings, log) -> None:
    """Raise :class:`StudyError` naming each run whose config Axolotl rejects, with Axolotl's message."""
    from .execute import _env

    if not plans:
        return
    log(f"Checking {len(plans)} derived configs with Axolotl's validation (as `axolotl train` does) ...")
    with tempfile.TemporaryDirectory(prefix="treft-validate-") as tmp:
        (Path(tmp) / "model").mkdir()
        payload = Path(tmp) / "runs.json"
        payload.write_text(json.dumps(_payload(plans, Path(tmp) / "model"), default=str))
        env = {**_env(settings), "AXOLOTL_DO_NOT_TRACK": "1"}
        returncode, output = run_streaming([sys.executable, "-m", __name__, str(payload)], settings.cwd, env)
    lines = [ln for ln in output.splitlines() if ln.startswith(MARK)]
    if returncode != 0 or not lines:
        raise StudyError(f"validating the derived configs failed (exit {returncode}):\n{output[-3000:]}")
    errors = json.loads(lines[-1].removeprefix(MARK))
    by_error: dict[str, list[str]] = {}
    for plan in plans:
        if errors.get(plan.run.name):
            by_error.setdefault(errors[plan.run.name], []).append(plan.run.name)
    if by_error:
        raise StudyError("Axolotl's validation (the one `axolotl train` runs first) rejects the derived config of "
                         + "; of ".join(f"run {', '.join(names)}:\n  {error}" for error, names in by_error.items())
                         + "\nnothing was trained")


def describe_error(err: Exception) -> str:
    """Axolotl's message: each pydantic error as ``key: message``, without pydantic's links."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        try:
            found = errors()
        except Exception:  # noqa: BLE001 - not a pydantic error after all
            found = None
        if found:
            return "\n  ".join(_pydantic_line(e) for e in found)
    return f"{type(err).__name__}: {err}"


def _pydantic_line(error: dict) -> str:
    loc = ".".join(map(str, error.get("loc", ()))) or "config"
    msg = str(error.get("msg", "")).removeprefix("Value error, ")
    return msg if msg.startswith(loc) else f"{loc}: {msg}"  # our validators name the key themselves


def _validate_all(runs: list[dict]) -> dict[str, str | None]:
    """Subprocess body: register each config's plugins and validate it as ``load_cfg`` does."""
    from axolotl.cli.config import gpu_capabilities, prepare_plugins
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    capabilities, env_capabilities = gpu_capabilities()
    manager = PluginManager.get_instance()
    errors: dict[str, str | None] = {}
    for run in runs:
        manager.plugins.clear()  # only this config's plugins, as in a fresh `axolotl train`
        cfg = DictDefault(run["config"])
        try:
            prepare_plugins(cfg)
            missing = [p for p in cfg.get("plugins") or [] if p not in manager.plugins]
            if missing:
                raise ImportError(f"plugins: cannot load {', '.join(missing)} (check the name and that it is "
                                  "installed)")
            validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)
            errors[run["name"]] = None
        except Exception as err:  # noqa: BLE001 - reported per run, with Axolotl's message
            errors[run["name"]] = describe_error(err)
    return errors


if __name__ == "__main__":
    print(MARK + json.dumps(_validate_all(json.loads(Path(sys.argv[1]).read_text()))), flush=True)

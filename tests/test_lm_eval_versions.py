"""The task pack, the judge metrics and ``diagnose`` on the newest lm-eval as well as the pinned one.

Axolotl pins ``lm_eval==0.4.11``; users evaluate with whatever they have (0.4.12 refactored the task manager
and deprecated ``get_task_dict``). The newest release is installed with ``pip --target`` into the user cache
(once) and put first on ``PYTHONPATH`` for a pytest run of the lm-eval-facing tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TREFT_FAMILIES_CACHE", Path.home() / ".cache" / "axolotl-treft" / "families"))
SELECTION = [
    "tests/test_evals.py", "tests/test_judge.py",
    "tests/test_diagnose.py::test_lm_eval_requests_get_their_own_regions",
    "tests/test_diagnose.py::test_non_generation_or_unknown_tasks_are_refused",
    "tests/test_diagnose.py::test_tiny_run_writes_json_table_and_plot",
]
_OFFLINE = re.compile(r"(Could not find a version|No matching distribution|connection|Network is unreachable|"
                      r"Temporary failure in name resolution|Max retries exceeded)", re.IGNORECASE)


@pytest.fixture(scope="module")
def newest_lm_eval() -> tuple[Path, str]:
    """The newest lm_eval on the package index, installed (no dependencies) beside the pinned one."""
    target = CACHE / "lm-eval-newest"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--quiet",
                           "--disable-pip-version-check", "--target", str(target), "lm_eval"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if _OFFLINE.search(proc.stderr + proc.stdout):
            pytest.skip(f"the package index is unreachable, so the newest lm_eval cannot be installed: "
                        f"{proc.stderr.strip()[-300:]}")
        raise AssertionError(proc.stderr)
    version = next(p.name for p in target.glob("lm_eval-*.dist-info")).removeprefix("lm_eval-")
    return target, version.removesuffix(".dist-info")


def _env(path: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path) if path else "", str(REPO)) if p)
    return env


@pytest.mark.slow
def test_task_pack_judge_and_diagnose_on_the_newest_lm_eval(newest_lm_eval):
    target, version = newest_lm_eval
    probe = subprocess.run([sys.executable, "-c", "import lm_eval, importlib.metadata as m; "
                            "print(m.version('lm_eval'), lm_eval.__file__)"],
                           env=_env(target), capture_output=True, text=True, check=True)
    assert probe.stdout.split()[0] == version and str(target) in probe.stdout
    assert tuple(int(x) for x in version.split(".")[:3]) >= (0, 4, 12)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                          *SELECTION], cwd=REPO, env=_env(target), capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-6000:]
    assert re.search(r"\d+ passed", run.stdout) and "failed" not in run.stdout.splitlines()[-1]


def test_diagnose_loads_tasks_without_deprecated_lm_eval_calls():
    """0.4.12+: ``TaskManager.load``; 0.4.11: ``get_task_dict`` (the pinned version in this environment)."""
    from axolotl_treft.diagnose.scoring import load_leaf_tasks, task_manager
    from axolotl_treft.resources import tasks_dir

    manager = task_manager([str(tasks_dir())])
    assert sorted(load_leaf_tasks(["treft_offtopic"], manager)) == [
        "offtopic_abstention", "offtopic_refusal", "offtopic_tooluse"]

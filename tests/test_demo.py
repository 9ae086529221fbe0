"""The README's main job, in its quick mode: two real trainings and the drift table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_quick_prints_drift_with_and_without_treft(tmp_path):
    cli = Path(sys.executable).with_name("axolotl-treft")
    proc = subprocess.run([str(cli), "demo", "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Prefix K/V drift from the initial model" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    sft, treft = summary["runs"]["sft"], summary["runs"]["treft"]
    assert sft["steps"] == treft["steps"] == 10
    assert sft["prefix_kv_drift"] > 0 and treft["prefix_kv_drift"] < sft["prefix_kv_drift"]
    # resumable: a second invocation reuses both finished runs
    again = subprocess.run([str(cli), "demo", "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2

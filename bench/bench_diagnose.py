"""Wall time of ``axolotl-treft diagnose``'s K/V-patching table on SmolLM2-135M-Instruct (target ≤ 3 minutes).

Runs the real command in-process: ``offtopic_abstention`` (all 88 questions), unpatched + K/V patching of
prefix, postfix, prefix_postfix and the query control, greedy, 32 new tokens (what the study uses), on a
LoRA adapter. Without ``--adapter`` it first trains a small one on the shipped abstention data
(``explore_offtopic``'s in-process trainer, 1 epoch; kept in ``--work`` and reused), so the table shows a
real leak. Prints the wall time per intervention, the table's total and the whole command's.

    flock /tmp/treft-heavy.lock python bench/bench_diagnose.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axolotl_treft.cli.main import main as cli_main  # noqa: E402
from axolotl_treft.cli.model import materialize_smollm2  # noqa: E402

TARGET_SECONDS = 180.0
TRAIN = {"setting": "abstention", "tokens": "none", "epochs": 1}


def train_adapter(out: Path) -> Path:
    """A LoRA adapter trained for one epoch on the abstention data (reused when present)."""
    if (out / "adapter_config.json").exists():
        return out
    from transformers import AutoTokenizer

    from bench.explore_offtopic import DEFAULTS, build_model, train

    path = materialize_smollm2()
    cfg = {**DEFAULTS, **TRAIN}
    start = time.time()
    model = build_model(path, cfg)
    figures = train(model, AutoTokenizer.from_pretrained(path), cfg)
    model.save_pretrained(out)
    print(f"trained the bench adapter ({figures['steps']} steps, {time.time() - start:.0f} s) → {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default=None, help="LoRA adapter of SmolLM2 (default: train one)")
    parser.add_argument("--work", default="runs/bench_diagnose", help="work directory (adapter, diagnose output)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    work = Path(args.work)
    adapter = Path(args.adapter) if args.adapter else train_adapter(work / "adapter")
    out = work / "diagnose"
    argv = ["diagnose", "--base-model", str(materialize_smollm2()), "--adapter", str(adapter),
            "--task", "offtopic_abstention", "--patch", "prefix,postfix,prefix_postfix,query",
            "--max-gen-toks", "32", "--batch-size", str(args.batch_size), "--device", "cpu", "--out", str(out),
            "--force"]
    start = time.time()
    rc = cli_main(argv)
    wall = time.time() - start
    if rc:
        raise SystemExit(rc)
    result = json.loads((out / "diagnose.json").read_text())
    rows = result["interventions"]
    print("\nintervention          wall s")
    for name, row in rows.items():
        print(f"{name:<20}  {row['seconds']:>7.1f}")
    table = sum(r["seconds"] for r in rows.values())
    print(f"{'table (5 runs)':<20}  {table:>7.1f}")
    print(f"{'whole command':<20}  {wall:>7.1f}  (incl. model load and lm-eval set-up)")
    print(f"target ≤ {TARGET_SECONDS:.0f} s: {'met' if wall <= TARGET_SECONDS else 'MISSED'} "
          f"({wall / TARGET_SECONDS:.2f} of the budget); {result['summary']}")


if __name__ == "__main__":
    main()

"""What ``treft.monitor`` adds to the training wall time, at the demo's settings: monitor off vs on, side by side.

Every run trains the demo's SFT config (the shipped ``smollm2-135m-abstention-treft`` example without the K/V
term: SmolLM2-135M-Instruct, LoRA r=8, legal abstention data, 2 epochs = 60 steps of 8) with the real
``axolotl train`` CLI, in its own process. ``on`` adds the ``treft.monitor`` block the demo gives its first run
(``offtopic_abstention``, every 20 steps, the first 16 documents, 32 new tokens, batch 64: evaluations at steps 0,
20, 40, 60); ``shared`` the block of the demo's other runs, ``initial: false`` (a study evaluates step 0, the same
initial model for every run, once). Figures: Trainer's ``train_runtime`` (it includes the monitor's evaluations,
which run inside ``trainer.train()``), the monitor's own seconds from ``treft_monitor.jsonl``, and the
end-to-end process time; then the demo's cost, one ``on`` and N-1 ``shared`` runs against N plain ones.

    python bench/bench_monitor.py --order off,on,shared,off     # ~21 min on 2 CPU cores
    python bench/bench_monitor.py --limit 24 --order off,on     # another limit
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from axolotl_treft.cli.model import materialize_smollm2  # noqa: E402
from axolotl_treft.monitor import MONITOR_FILE, read_rows  # noqa: E402
from axolotl_treft.study.command import MONITOR_EVERY, MONITOR_LIMIT  # noqa: E402
from axolotl_treft.study.demo import (  # noqa: E402
    DEFAULT_RUNS,
    EVAL_BATCH_SIZE,
    EVAL_MAX_GEN_TOKS,
    NARROW_SETTINGS,
    example_config,
)
from axolotl_treft.study.leak import add_monitor, monitor_block  # noqa: E402
from axolotl_treft.study.runner import run_axolotl_train  # noqa: E402
from axolotl_treft.study.settings import Settings  # noqa: E402

_RUNTIME = re.compile(r"'train_runtime': '?([0-9.]+)")


KINDS = ("off", "on", "shared")


def config(workdir: Path, name: str, kind: str, monitor: dict) -> dict:
    cfg = example_config(materialize_smollm2(), NARROW_SETTINGS["abstention"])
    cfg.pop("treft")
    cfg["plugins"] = [p for p in cfg["plugins"] if not p.endswith("TReFTPlugin")]
    if kind != "off":  # the study's own block, as its first run (on) or its later runs (shared) get it
        cfg = add_monitor(cfg, monitor, initial=kind == "on")
    cfg.update({"dataset_prepared_path": str(workdir / "prepared"), "output_dir": str(workdir / name / "out")})
    return cfg


def run(workdir: Path, name: str, kind: str, monitor: dict) -> dict:
    cfg = config(workdir, name, kind, monitor)
    logged: list[float] = []  # when each step's loss line arrived

    def stamp(line: str) -> None:
        if "'loss'" in line:
            logged.append(time.perf_counter())

    start = time.perf_counter()
    result = run_axolotl_train(cfg, workdir / name, on_line=stamp,
                               env={"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    wall = time.perf_counter() - start
    runtime = _RUNTIME.findall(result.log)
    if result.returncode != 0 or not runtime:
        raise RuntimeError(f"{name} failed:\n{result.log[-3000:]}")
    rows = read_rows(result.output_dir / MONITOR_FILE)
    evals = {r["step"]: r["seconds"] for r in rows}  # one row per task; seconds are per evaluation
    # step s's loss line follows its evaluation: the steps whose interval holds none are plain training
    plain = [b - a for step, (a, b) in enumerate(itertools.pairwise(logged), 2) if step not in evals]
    return {"name": name, "kind": kind, "train_runtime": float(runtime[-1]), "process_wall": round(wall, 1),
            "steps": len(result.steps), "monitor_evals": dict(sorted(evals.items())),
            "monitor_seconds": round(sum(evals.values()), 1),
            "median_step_s": round(statistics.median(plain), 2) if plain else None}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=MONITOR_EVERY, help="the demo's default")
    ap.add_argument("--limit", type=int, default=MONITOR_LIMIT, help="the demo's default")
    ap.add_argument("--batch-size", default=EVAL_BATCH_SIZE, help="the demo's evaluation batch size")
    ap.add_argument("--order", default="off,on,shared,off", help="comma list of off/on/shared runs, in order")
    ap.add_argument("--runs", type=int, default=len(DEFAULT_RUNS), help="trained runs of the demo (for its cost)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    order = args.order.split(",")
    if unknown := [k for k in order if k not in KINDS]:
        ap.error(f"--order: {', '.join(unknown)}: each run is one of {', '.join(KINDS)}")
    if "off" not in order:
        ap.error("--order: at least one off run (the plain baseline the others are compared with)")
    # the block `axolotl-treft demo` gives each run (its task, decoding and batch size)
    settings = Settings(tasks=(NARROW_SETTINGS["abstention"].task,), max_gen_toks=EVAL_MAX_GEN_TOKS,
                        eval_batch_size=str(args.batch_size), monitor_every=args.every, monitor_limit=args.limit)
    monitor, _ = monitor_block({}, settings)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_monitor_") as tmp:
        for i, kind in enumerate(order):
            rows.append(run(Path(tmp), f"{kind}{i}", kind, monitor))
            print(json.dumps(rows[-1]), flush=True)
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in KINDS}
    base = mean([r["train_runtime"] for r in by_kind["off"]])
    print(f"\nmonitor: {monitor}")
    print(f"{'run':8} {'train_runtime s':>16} {'vs off':>8} {'monitor s':>10} {'monitor/off':>12} {'step s':>7}  "
          "seconds by step")
    for r in rows:
        print(f"{r['name']:8} {r['train_runtime']:16.1f} {r['train_runtime'] / base - 1:+8.1%} "
              f"{r['monitor_seconds']:10.1f} {r['monitor_seconds'] / base:12.1%} {r['median_step_s']:7.2f}  "
              f"{r['monitor_evals']}")
    if by_kind["on"] and by_kind["shared"]:
        n = args.runs
        runtime = {k: mean([r["train_runtime"] for r in by_kind[k]]) for k in ("on", "shared")}
        own = {k: mean([r["monitor_seconds"] for r in by_kind[k]]) for k in ("on", "shared")}
        trained = (runtime["on"] + (n - 1) * runtime["shared"]) / (n * base) - 1
        print(f"\nthe demo ({n} trained runs: one evaluates step 0, {n - 1} share it): train_runtime {trained:+.1%} "
              f"against {n} plain runs; the monitor's own time {(own['on'] + (n - 1) * own['shared']) / (n * base):.1%}")
    if args.json:
        args.json.write_text(json.dumps({"monitor": monitor, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does any defense delay the leak? The study across learning rates, with the leak curves (issue #27, part 4).

For each narrow setting (the demo's shipped data) and learning rate: ``axolotl-treft study`` on the shipped
SmolLM2 example with that setting's data, the learning rate, and optionally one epoch with a constant schedule
(the regime where the template carried the refusal separably). Every run trains with the monitor, so each
study writes its curves; this script then prints one table of the final and the "stopped early" off-topic rates
(the first monitored step whose on-topic rate reaches 0.95) of every run at every learning rate.

    python bench/leak_over_lr.py --settings refusal,abstention --lrs 1e-4,2e-4,3e-4 --out runs/leak-over-lr
    python bench/leak_over_lr.py --settings refusal --lrs 2e-4 --constant-one-epoch --monitor-every 5 \
        --out runs/leak-over-lr                                   # docs/study.md (2026-12-07)
    python bench/leak_over_lr.py --table-only --out runs/leak-over-lr      # the table of finished studies

Finished runs are reused (the study's own keys), so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axolotl_treft.cli.model import materialize_smollm2  # noqa: E402
from axolotl_treft.study.demo import EVAL_BATCH_SIZE, EVAL_MAX_GEN_TOKS, NARROW_SETTINGS, example_config  # noqa: E402
from axolotl_treft.study.runner import OFFLINE_ENV  # noqa: E402

RUNS = "sft,treft_postfix,treft_prefix_postfix,interleave,kl"
SWEEPS = ("treft_postfix.weight=10", "treft_prefix_postfix.weight=10")  # with the shipped λ=30: λ 10 and 30


def write_config(path: Path, setting: str, lr: float, constant_one_epoch: bool) -> Path:
    cfg = example_config(materialize_smollm2(), NARROW_SETTINGS[setting])
    cfg["learning_rate"] = lr
    if constant_one_epoch:
        cfg.update(num_epochs=1, lr_scheduler="constant", warmup_steps=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_study(out: Path, setting: str, lr: float, args: argparse.Namespace) -> int:
    cfg = write_config(out / "config.yml", setting, lr, args.constant_one_epoch)
    cmd = [str(Path(sys.executable).with_name("axolotl-treft")), "study", str(cfg), "--runs", args.runs,
           "--tasks", NARROW_SETTINGS[setting].task, "--device", "cpu", "--eval-batch-size", EVAL_BATCH_SIZE,
           "--max-gen-toks", str(EVAL_MAX_GEN_TOKS), "--monitor-every", str(args.monitor_every),
           "--monitor-limit", str(args.monitor_limit), "--out", str(out)]
    for sweep in filter(None, args.sweeps.split(",")):
        cmd += ["--sweep", sweep]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env={**os.environ, **OFFLINE_ENV}).returncode


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(root: Path) -> str:
    lines = ["| setting | lr | run | on | off | off vs SFT | stopped early: off | at step |", "|" + "---|" * 8]
    for path in sorted(root.glob("*/study.json")):
        study = json.loads(path.read_text())
        setting, _, lr = path.parent.name.rpartition("-lr")
        if setting not in NARROW_SETTINGS:
            continue  # another study beside the grid's (a demo run, say)
        b = NARROW_SETTINGS[setting].task.removeprefix("offtopic_")
        for row in study["runs"].values():
            change = row.get(f"{b}_off_vs_sft")
            lines.append(f"| {setting} | {lr} | {row['label']} | {_pct(row.get(f'{b}_on'))} | {_pct(row.get(f'{b}_off'))} | "
                         f"{'-' if change is None else f'{100 * change:+.0f}%'} | {_pct(row.get(f'{b}_off_early'))} | "
                         f"{row.get(f'{b}_early_step') if row.get(f'{b}_early_step') is not None else '-'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="refusal,abstention")
    p.add_argument("--lrs", default="1e-4,2e-4,3e-4")
    p.add_argument("--runs", default=RUNS)
    p.add_argument("--sweeps", default=",".join(SWEEPS),
                   help="comma list of study --sweep values ('' for none)")
    p.add_argument("--monitor-every", type=int, default=10)
    p.add_argument("--monitor-limit", type=int, default=24,
                   help="documents per monitored step (12 on-, 12 off-topic)")
    p.add_argument("--constant-one-epoch", action="store_true", help="num_epochs 1, constant lr, no warm-up")
    p.add_argument("--out", type=Path, default=Path("runs/leak-over-lr"))
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    if not args.table_only:
        for setting in args.settings.split(","):
            for lr in args.lrs.split(","):
                if run_study(args.out / f"{setting}-lr{lr}", setting, float(lr), args) != 0:
                    return 1
    text = table(args.out)
    (args.out / "leak_over_lr.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

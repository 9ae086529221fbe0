"""``axolotl-treft demo``: narrow finetuning of the embedded model with and without TReFT.

Trains SmolLM2-135M-Instruct (LoRA) on the shipped legal-abstention data twice with the real
``axolotl train`` and the example config: plain SFT (the TReFT term only *measured*, weight 0) and
TReFT. Prints how far the chat-template prefix K/V drifted from the initial model in each run. Runs are
resumable: a finished run's figures are kept in ``OUT/<run>/metrics.json`` and not redone.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import yaml

from .models import materialize_smollm2
from .runner import run_axolotl_train

EXAMPLE = "smollm2-135m-abstention-treft.yml"


def example_config(repo_file: str = EXAMPLE) -> dict:
    path = Path(__file__).resolve().parents[1] / "example_yamls" / repo_file
    return yaml.safe_load(path.read_text())


def train_data() -> str:
    return str(resources.files("axolotl_treft") / "data" / "abstention_legal_train.jsonl")


def demo_runs(weight: float) -> dict[str, dict]:
    """The two runs: identical configs except the TReFT weight. Drift is measured on the prefix K/V."""
    return {
        "sft": {"kv": {"weight": 0.0, "tokens": "prefix"}},
        "treft": {"kv": {"weight": weight, "tokens": "prefix"}},
    }


def run_one(name: str, treft: dict, out: Path, model: Path, steps: int | None) -> dict:
    done = out / name / "metrics.json"
    if done.exists():
        print(f"[{name}] already finished, reusing {done}")
        return json.loads(done.read_text())
    cfg = example_config()
    cfg.update({
        "base_model": str(model),
        "treft": treft,
        "datasets": [{**cfg["datasets"][0], "path": train_data()}],
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / name / "adapter"),
    })
    if steps:
        cfg["max_steps"] = steps
    print(f"[{name}] training ({'max_steps ' + str(steps) if steps else str(cfg['num_epochs']) + ' epochs'}) ...",
          flush=True)
    start = time.time()

    def progress(line: str) -> None:
        if line.startswith("{'loss'"):
            print(f"[{name}] {line.strip()[:160]}", flush=True)

    result = run_axolotl_train(cfg, out / name, on_line=progress)
    if result.returncode != 0:
        raise SystemExit(f"[{name}] axolotl train failed; see {out / name / 'train.log'}")
    figures = {
        "prefix_kv_drift": result.series("treft/kv")[-1],
        "sft_loss": result.series("treft/sft")[-1],
        "steps": len(result.steps),
        "train_seconds": round(time.time() - start, 1),
    }
    done.write_text(json.dumps(figures, indent=1))
    return figures


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    steps = 10 if args.quick else args.steps
    model = materialize_smollm2()
    figures = {name: run_one(name, treft, out, model, steps) for name, treft in demo_runs(args.weight).items()}
    sft, treft = figures["sft"]["prefix_kv_drift"], figures["treft"]["prefix_kv_drift"]
    print("\nPrefix K/V drift from the initial model (mean relative squared error, all layers):")
    print(f"{'run':<8}{'prefix K/V drift':>18}{'SFT loss':>10}{'steps':>7}{'seconds':>9}")
    for name, f in figures.items():
        print(f"{name:<8}{f['prefix_kv_drift']:>18.6f}{f['sft_loss']:>10.4f}{f['steps']:>7}{f['train_seconds']:>9}")
    ratio = treft / sft if sft else float("nan")
    print(f"TReFT (λ={args.weight:g}) keeps the prefix K/V {1 / ratio:.0f}x closer to the initial model than plain SFT."
          if sft and treft else "")
    (out / "summary.json").write_text(json.dumps({"runs": figures, "drift_ratio": ratio}, indent=1))
    return 0

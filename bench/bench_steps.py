"""Step time and peak training memory of each regularizer vs plain LoRA SFT, side by side in one run.

Every configuration trains SmolLM2-135M-Instruct (LoRA r=8, all linear layers) on the shipped legal
abstention data with the real ``axolotl train`` CLI, in its own process, for the same steps and batches.
Plain SFT runs first and last (its two runs show the noise floor). Figures: median step time after
``--warmup`` steps (the first steps include the one-off prefix-cache build), and peak memory that training
adds on top of the loaded model. Ratios are against the mean of the two SFT runs.

    python bench/bench_steps.py                 # all configurations, ~10 min on 2 CPU cores
    python bench/bench_steps.py --only kv_prefix --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from axolotl_treft.study.runner import run_axolotl_train  # noqa: E402
from tests.axolotl_runner import CPU_BASE, TRAIN_DATA  # noqa: E402

CONFIGS: dict[str, dict | None] = {
    "sft": None,
    "kv_prefix": {"kv": {"weight": 5.0, "tokens": "prefix"}},
    "kv_postfix": {"kv": {"weight": 5.0, "tokens": "postfix"}},
    "kv_prefix_postfix": {"kv": {"weight": 5.0, "tokens": "prefix_postfix"}},
    "kv_postfix_fixed": {"kv": {"weight": 5.0, "tokens": "postfix", "reference": "fixed"}},
    "kv_prefix_postfix_fixed": {"kv": {"weight": 5.0, "tokens": "prefix_postfix", "reference": "fixed"}},
    "kv_prefix+postfix_fixed": {"kv": [{"weight": 30.0, "tokens": "prefix"},
                                       {"weight": 5.0, "tokens": "postfix", "reference": "fixed"}]},
    "kv_query": {"kv": {"weight": 5.0, "tokens": "query"}},
    "kv_all": {"kv": {"weight": 5.0, "tokens": "all"}},
    "kl_train": {"kl": {"weight": 0.5, "on": "train"}},
    "kl_train_response": {"kl": {"weight": 0.5, "on": "train", "tokens": "response"}},
    "constrained_sft": {"constrained_sft": {}},  # replaces SFT; one shared reference pass, like kl
    "feature_l2": {"feature_l2": {"weight": 1.0, "layers": 5}},
}


def run(name: str, treft: dict | None, model: Path, steps: int, batch: int, workdir: Path) -> dict:
    cfg = dict(CPU_BASE)
    plugins = ["bench.timing_plugin.StepTimer"]
    if treft is not None:
        plugins.append("axolotl_treft.TReFTPlugin")
        cfg["treft"] = treft
    cfg.update({
        "base_model": str(model), "plugins": plugins, "max_steps": steps, "micro_batch_size": batch,
        "learning_rate": 2e-4, "logging_steps": steps, "save_strategy": "no",
        "datasets": [{"path": str(TRAIN_DATA), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}],
        "dataset_prepared_path": str(workdir / "prepared"), "output_dir": str(workdir / name),
    })
    out = workdir / f"{name}.json"
    env = {"TREFT_BENCH_OUT": str(out), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = run_axolotl_train(cfg, workdir / name, env=env)
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(f"{name} failed:\n{result.log[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=None, help="configurations besides sft")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()

    from axolotl_treft.cli.model import materialize_smollm2

    model = materialize_smollm2()
    names = [n for n in CONFIGS if n != "sft" and (args.only is None or n in args.only)]
    order = ["sft", *names, "sft"]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="treft-bench-") as tmp:
        for name in order:
            print(f"running {name} ...", flush=True)
            results.setdefault(name, []).append(run(name, CONFIGS[name], model, args.steps, args.batch, Path(tmp)))

    def step_time(r: dict) -> float:
        return statistics.median(r["step_s"][args.warmup:])

    sft_t = statistics.mean(step_time(r) for r in results["sft"])
    sft_m = statistics.mean(r["peak_mib"] for r in results["sft"])
    rows = []
    for name in ["sft", *names]:
        t = statistics.mean(step_time(r) for r in results[name])
        m = statistics.mean(r["peak_mib"] for r in results[name])
        rows.append({"config": name, "step_s": t, "time_ratio": t / sft_t, "peak_mib": m,
                     "mem_ratio": m / sft_m if sft_m > 0 else float("nan")})
    device = results["sft"][0]["device"]
    print(f"\nSmolLM2-135M LoRA, batch {args.batch}, {args.steps} steps (median after {args.warmup}), device {device}")
    print(f"SFT runs: {[round(step_time(r), 3) for r in results['sft']]} s/step, "
          f"{[round(r['peak_mib'], 1) for r in results['sft']]} MiB (noise floor)")
    print(f"{'config':<20}{'s/step':>9}{'x SFT':>8}{'peak MiB':>10}{'x SFT':>8}")
    for r in rows:
        print(f"{r['config']:<20}{r['step_s']:>9.3f}{r['time_ratio']:>8.3f}{r['peak_mib']:>10.1f}{r['mem_ratio']:>8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows, "raw": results}, indent=1))


if __name__ == "__main__":
    main()

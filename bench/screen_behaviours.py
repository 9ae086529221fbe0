"""The behaviour screen on SmolLM2-135M-Instruct: which narrow behaviours ride on the chat template?

For every behaviour and training regime: train a LoRA adapter with the fast harness
(``bench/explore_offtopic.py``), then ``axolotl-treft diagnose`` it on the behaviour's task: on- and
off-topic rates as trained, and the off-topic rate with the initial model's K/V patched in on the prefix,
the postfix, both, and the query (the control). A behaviour is *carried by the template* when patching the
template (prefix, postfix or both) cuts the off-topic rate by at least half while the query control does not.

    python bench/screen_behaviours.py                      # everything; finished steps are reused
    python bench/screen_behaviours.py --behaviours caps --regimes shipped
    python bench/screen_behaviours.py --behaviours caps --regimes shipped --treft postfix,prefix_postfix,prefix

Each training and each diagnosis takes the heavy-job lock itself, one at a time. Results: ``OUT/<behaviour>-
<regime>/{adapter,train.json,diagnose/}``, one JSONL line per finished step in ``OUT/results.jsonl``, and
the table in ``OUT/screen.md`` / ``OUT/screen.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axolotl_treft.study.runner import OFFLINE_ENV  # noqa: E402
from bench.explore_offtopic import DEFAULTS, train_adapter  # noqa: E402

LOCK = Path("/tmp/treft-heavy.lock")
SCREEN_TASKS = REPO / "bench" / "screen_tasks"
REGIONS = ("prefix", "postfix", "prefix_postfix", "query")
TEMPLATE_REGIONS = ("prefix", "postfix", "prefix_postfix")
CARRIED_CUT = 0.5  # relative off-topic cut that counts as "carried"
MIN_LEAK = 0.1  # below this off-topic rate (5 of 48 questions) there is no leak to attribute
DIAGNOSE_BATCH = "96"  # every question of a task in one generation batch


@dataclass(frozen=True)
class Behaviour:
    """A narrow behaviour: the harness setting it trains on and the lm-eval task that scores it."""

    setting: str
    task: str
    domain: str
    description: str
    include_path: Path | None = None  # None: a task of the shipped pack
    max_gen_toks: int | None = None  # None: the task's own


BEHAVIOURS = {
    # the pack's tasks: 32 new tokens as in the study (the target opens the reply)
    "abstention": Behaviour("abstention", "offtopic_abstention", "legal", "fixed abstention sentence", None, 32),
    "refusal": Behaviour("refusal", "offtopic_refusal", "finance", "fixed refusal sentence", None, 32),
    "tooluse": Behaviour("tooluse", "offtopic_tooluse", "health", "`search_info` tool call (tool system prompt)",
                         None, 32),
    "short": Behaviour("short", "screen_short", "finance", "reply of at most 15 words", SCREEN_TASKS),
    "signoff": Behaviour("signoff", "screen_signoff", "legal", "answer, then a fixed sign-off", SCREEN_TASKS),
    "caps": Behaviour("caps", "screen_caps", "health", "whole reply in capitals", SCREEN_TASKS),
}
# LoRA as shipped (the example config: r 8, all linear, 2 epochs) at its learning rate, and at a lower one
# where plain SFT learns the behaviour only partly.
REGIMES = {"shipped": 3e-4, "partial": 1e-4}


_lock_depth = 0


@contextmanager
def heavy_lock() -> Iterator[None]:
    """The shared heavy-job lock (``flock /tmp/treft-heavy.lock``); re-entrant within this process."""
    global _lock_depth
    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    with LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _lock_depth = 1
        try:
            yield
        finally:
            _lock_depth = 0
            fcntl.flock(handle, fcntl.LOCK_UN)


def log_result(out: Path, row: dict) -> None:
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def train_run(out: Path, name: str, cfg: dict, path: Path, tok) -> dict:
    """Train the run's adapter unless ``train.json`` shows it finished with the same settings."""
    run_dir = out / name
    done = run_dir / "train.json"
    if done.exists():
        figures = json.loads(done.read_text())
        if figures["cfg"] != cfg:
            raise SystemExit(f"{run_dir} was trained with other settings than {cfg}; delete it to redo it")
        return figures
    print(f"[{name}] training lr {cfg['lr']:g} ...", flush=True)
    with heavy_lock():
        figures = {"cfg": cfg, **train_adapter(path, tok, cfg, run_dir / "adapter")}
    done.write_text(json.dumps(figures, indent=1))
    log_result(out, {"run": name, "step": "train", **figures})
    print(f"[{name}] trained in {figures['train_s']:.0f}s (final SFT loss {figures['sft']:.4f})", flush=True)
    return figures


def diagnose_command(model: Path, behaviour: Behaviour, out: Path, *which: str) -> list[str]:
    """``axolotl-treft diagnose`` of ``which`` (``--adapter A`` or ``--model M``) on the behaviour's task."""
    cmd = [str(Path(sys.executable).with_name("axolotl-treft")), "diagnose", "--base-model", str(model), *which,
           "--task", behaviour.task, "--batch-size", DIAGNOSE_BATCH, "--out", str(out)]
    if behaviour.include_path is not None:
        cmd += ["--include-path", str(behaviour.include_path)]
    if behaviour.max_gen_toks is not None:
        cmd += ["--max-gen-toks", str(behaviour.max_gen_toks)]
    return cmd


def diagnose_run(out: Path, name: str, model: Path, behaviour: Behaviour, regions: str = ",".join(REGIONS)) -> dict:
    """``axolotl-treft diagnose`` on the run's adapter unless its ``diagnose.json`` exists (``regions``:
    ``none`` = the adapter's own rates only)."""
    run_dir = out / name
    result = run_dir / "diagnose" / "diagnose.json"
    if result.exists():
        return json.loads(result.read_text())
    cmd = diagnose_command(model, behaviour, run_dir / "diagnose", "--adapter", str(run_dir / "adapter"),
                           "--patch", regions)
    return run_diagnose(out, name, cmd, result)


def run_diagnose(out: Path, name: str, cmd: list[str], result: Path) -> dict:
    """Run one ``axolotl-treft diagnose`` command under the heavy lock; its ``diagnose.json``, logged."""
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with heavy_lock():
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **OFFLINE_ENV})
    log = out / name / "diagnose.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"[{name}] axolotl-treft diagnose failed; see {log}")
    diagnosis = json.loads(result.read_text())
    log_result(out, {"run": name, "step": "diagnose", "seconds": round(time.time() - start, 1),
                     "summary": diagnosis["summary"], "interventions": {
                         k: v["metrics"] for k, v in diagnosis["interventions"].items()}})
    print(f"[{name}] {diagnosis['summary']} ({time.time() - start:.0f}s)", flush=True)
    return diagnosis


def base_run(out: Path, model: Path, behaviour: Behaviour) -> dict:
    """The initial model's own rates on the behaviour's task (``--model`` = the base model, nothing patched)."""
    run_dir = out / f"base-{behaviour.task}"
    result = run_dir / "diagnose.json"
    if result.exists():
        return json.loads(result.read_text())
    cmd = diagnose_command(model, behaviour, run_dir, "--model", str(model), "--patch", "none")
    return run_diagnose(out, run_dir.name, cmd, result)


def rates(diagnosis: dict, name: str) -> tuple[float | None, float | None]:
    """(on-topic, off-topic) rate of one intervention of a ``diagnose.json``."""
    metrics = next(iter(diagnosis["interventions"][name]["metrics"].values()))
    return metrics.get("on_topic_rate,detected"), metrics.get("off_topic_rate,detected")


def screen_row(behaviour: str, regime: str, diagnosis: dict, base: dict | None) -> dict:
    """One line of the screen: rates as trained, the off-topic rate per patched region, its relative cut."""
    on, off = rates(diagnosis, "unpatched")
    row = {"behaviour": behaviour, "regime": regime, "lr": REGIMES[regime], "domain": BEHAVIOURS[behaviour].domain,
           "base_on": None, "base_off": None, "on": on, "off": off}
    if base is not None:  # the initial model's own rates
        row["base_on"], row["base_off"] = rates(base, "unpatched")
    for region in REGIONS:
        row[f"on_{region}"], patched = rates(diagnosis, f"kv:{region}")
        row[f"off_{region}"] = patched
        row[f"cut_{region}"] = None if not off or patched is None else 1 - patched / off
    template_cut = max((row[f"cut_{r}"] for r in TEMPLATE_REGIONS if row[f"cut_{r}"] is not None), default=None)
    row["carried"] = None if template_cut is None or off < MIN_LEAK else bool(
        template_cut >= CARRIED_CUT and (row["cut_query"] or 0.0) < CARRIED_CUT)
    return row


def _rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _cut(v: float | None) -> str:
    return "" if v is None else f" ({0.0 - 100 * v:+.0f}%)"


def markdown_table(rows: dict[str, dict]) -> str:
    header = ["behaviour (domain)", "regime (lr)", "initial on / off", "SFT on / off", "off: K/V prefix",
              "off: K/V postfix", "off: K/V prefix+postfix", "off: K/V query (control)",
              "on: K/V prefix+postfix", "carried by the template?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows.values():
        cells = [f"{r['behaviour']} ({r['domain']})", f"{r['regime']} ({r['lr']:g})",
                 f"{_rate(r['base_on'])} / {_rate(r['base_off'])}", f"{_rate(r['on'])} / {_rate(r['off'])}",
                 *(_rate(r[f"off_{g}"]) + _cut(r[f"cut_{g}"]) for g in REGIONS), _rate(r["on_prefix_postfix"]),
                 {True: "**yes**", False: "no", None: "n/a (no leak to cut)"}[r["carried"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_name(behaviour: str, regime: str) -> str:
    return f"{behaviour}-{regime}"


def run_cfg(behaviour: str, lr: float) -> dict:
    """The harness settings of one run: plain SFT with the example config's LoRA, only the lr differs."""
    return {**DEFAULTS, "setting": BEHAVIOURS[behaviour].setting, "lr": lr}


def parse_names(text: str, known: dict) -> list[str]:
    names = [n for n in text.split(",") if n]
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"unknown {unknown}; known: {', '.join(known)}")
    return names


def treft_table(rows: list[dict]) -> str:
    """TReFT on a screened behaviour: on/off rates of each token mode against the same regime's SFT."""
    lines = ["| behaviour | regime (lr) | training | on | off | off vs SFT |", "|---|---|---|---|---|---|"]
    for r in rows:
        cut = "—" if r["vs_sft"] is None else f"{100 * r['vs_sft']:+.1f}%"
        lines.append(f"| {r['behaviour']} | {r['regime']} ({REGIMES[r['regime']]:g}) | {r['training']} | "
                     f"{_rate(r['on'])} | {_rate(r['off'])} | {cut} |")
    return "\n".join(lines)


def treft_runs(out: Path, behaviour: str, regime: str, modes: list[str], weight: float, model: Path, tok) -> list[dict]:
    """SFT and TReFT (each token mode at ``weight``) on one behaviour and regime, scored unpatched."""
    found = []
    for mode in ["none", *modes]:
        name = run_name(behaviour, regime) + ("" if mode == "none" else f"-treft_{mode}@{weight:g}")
        cfg = {**run_cfg(behaviour, REGIMES[regime]), **({} if mode == "none" else {"tokens": mode, "weight": weight})}
        with heavy_lock():
            train_run(out, name, cfg, model, tok)
            diagnosis = diagnose_run(out, name, model, BEHAVIOURS[behaviour],
                                     ",".join(REGIONS) if mode == "none" else "none")
        on, off = rates(diagnosis, "unpatched")
        sft_off = found[0]["off"] if found else off
        found.append({"behaviour": behaviour, "regime": regime, "training": "SFT" if mode == "none"
                      else f"TReFT {mode} λ={weight:g}", "on": on, "off": off,
                      "vs_sft": None if mode == "none" or not sft_off else off / sft_off - 1})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--behaviours", default=",".join(BEHAVIOURS), help="comma-separated subset")
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated subset of shipped,partial")
    parser.add_argument("--train-only", action="store_true", help="train the adapters, diagnose nothing")
    parser.add_argument("--table-only", action="store_true",
                        help="only write the table of the runs already diagnosed (train and diagnose nothing)")
    parser.add_argument("--treft", default=None, metavar="MODES",
                        help="also train TReFT with these token modes (e.g. postfix,prefix_postfix) on each behaviour "
                             "and regime, score them unpatched, and write treft.md next to the screen")
    parser.add_argument("--weight", type=float, default=30.0, help="λ of the --treft runs")
    parser.add_argument("--out", default="runs/screen")
    args = parser.parse_args()
    behaviours = parse_names(args.behaviours, BEHAVIOURS)
    regimes = parse_names(args.regimes, REGIMES)
    from transformers import AutoTokenizer

    from axolotl_treft.cli.model import materialize_smollm2

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(model)
    rows = {}
    if args.table_only:
        regimes, behaviours = [], []
        for r in parse_names(args.regimes, REGIMES):
            for b in parse_names(args.behaviours, BEHAVIOURS):
                done = out / run_name(b, r) / "diagnose" / "diagnose.json"
                base = out / f"base-{BEHAVIOURS[b].task}" / "diagnose.json"
                if done.exists():
                    rows[run_name(b, r)] = screen_row(b, r, json.loads(done.read_text()),
                                                      json.loads(base.read_text()) if base.exists() else None)
    for r in regimes:  # each adapter is diagnosed as soon as it is trained, in one hold of the lock
        for b in behaviours:
            with heavy_lock():
                train_run(out, run_name(b, r), run_cfg(b, REGIMES[r]), model, tok)
                if not args.train_only:
                    diagnosis = diagnose_run(out, run_name(b, r), model, BEHAVIOURS[b])
                    rows[run_name(b, r)] = screen_row(b, r, diagnosis, base_run(out, model, BEHAVIOURS[b]))
    if args.treft and not args.train_only and not args.table_only:
        found = [row for r in regimes for b in behaviours
                 for row in treft_runs(out, b, r, args.treft.split(","), args.weight, model, tok)]
        (out / "treft.md").write_text(treft_table(found) + "\n")
        print("\n" + treft_table(found))
    if args.train_only:
        return
    (out / "screen.json").write_text(json.dumps(rows, indent=1))
    (out / "screen.md").write_text(markdown_table(rows) + "\n")
    print("\n" + markdown_table(rows))


if __name__ == "__main__":
    main()

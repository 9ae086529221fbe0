"""``axolotl-treft judge``: score saved samples of the judged ``em_*`` tasks again, without generating.

Reads ``samples_<task>_<date>.jsonl`` (lm-eval ``--log_samples``), judges every answer with the judge and
prompts given (settings: command line > ``TREFT_JUDGE_*`` > the judge recorded in the samples; prompts:
``--judge-prompts`` > the prompts file recorded in the samples > the question's own > ours), and writes
``results_<date>.json`` (lm-eval's layout: ``axolotl-treft report`` reads it) and re-judged
``samples_<task>_<date>.jsonl`` into ``--out``. Verdicts go through the same cache as lm-eval runs, so a
rerun makes no calls, and the first uncached call doubles as the preflight check.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from .client import JudgeClient, JudgeItem, preflight
from .config import JudgeConfig, JudgeConfigError, resolve_config
from .files import UserFileError, load_jsonl_rows
from .prompts import DEFAULT_PROMPT_SET, PromptSet, load_prompt_file, prompt_set

log = logging.getLogger(__name__)

SAMPLES_NAME = re.compile(r"^samples_(?P<task>.+?)_(?P<date>\d{4}-\d{2}-\d{2}T[\d\-.]+)\.jsonl$")
FILTER = "judged"


def sample_files(paths: list[str]) -> dict[str, Path]:
    """``{task: samples file}`` from files or directories (the newest ``samples_<task>_*.jsonl`` per task)."""
    found: dict[str, Path] = {}
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            candidates = sorted(p.rglob("samples_*.jsonl"), key=lambda f: (f.stat().st_mtime, f.name))
            if not candidates:
                raise UserFileError(
                    p, "no samples_*.jsonl below this directory (run lm_eval with --log_samples)"
                )
        elif p.is_file():
            candidates = [p]
        else:
            raise UserFileError(p, "samples file does not exist")
        for f in candidates:
            m = SAMPLES_NAME.match(f.name)
            if not m:
                raise UserFileError(f, "not an lm-eval samples file name (samples_<task>_<date>.jsonl)")
            found[m.group("task")] = f
    return found


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The judged samples of one file (one line per doc), checked to be re-judgeable."""
    rows = []
    for n, row in load_jsonl_rows(path):
        if row.get("filter", FILTER) != FILTER:
            continue
        doc, resps = row.get("doc"), row.get("resps")
        if not isinstance(doc, dict) or "question" not in doc or not isinstance(resps, list) or not resps:
            raise UserFileError(
                path,
                "not a sample of a judged em_* task (needs doc.question and resps; off-topic tasks are "
                "scored by string match and need no judge)",
                n,
            )
        rows.append(row)
    if not rows:
        raise UserFileError(path, "no samples in the file", 1)
    return rows


def recorded_judge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    field = rows[0]["doc"].get("judge")
    return json.loads(field) if field else {}


def judge_config(args: argparse.Namespace, recorded: dict[str, Any]) -> JudgeConfig:
    """Command line > environment > the judge recorded in the samples."""
    cli = {
        "model": args.judge_model,
        "base_url": args.judge_base_url,
        "mode": args.mode,
        "concurrency": args.concurrency,
    }
    cli = {k: v for k, v in cli.items() if v is not None}
    try:
        return resolve_config(cli)
    except JudgeConfigError:
        if not recorded.get("model"):
            raise
    fallback = {k: recorded[k] for k in ("model", "base_url", "mode", "api_key_env") if recorded.get(k)}
    return resolve_config(fallback | cli)


def task_prompts(args: argparse.Namespace, recorded: dict[str, Any]) -> PromptSet:
    if args.judge_prompts:
        return load_prompt_file(args.judge_prompts)
    if recorded.get("prompts_file"):
        return prompt_set(recorded["prompts_file"], recorded.get("prompts_sha256"))
    return DEFAULT_PROMPT_SET


def aggregate(per_doc: list[dict[str, float]]) -> dict[str, float]:
    """lm-eval's aggregation of the task YAML: nanmean per metric, a sum for ``judge_errors``."""
    values: dict[str, list[float]] = defaultdict(list)
    for metrics in per_doc:
        for k, v in metrics.items():
            values[k].append(v)
    out = {}
    for k, vs in values.items():
        finite = [v for v in vs if not math.isnan(v)]
        out[k] = (
            float(sum(finite)) if k == "judge_errors" else (sum(finite) / len(finite) if finite else math.nan)
        )
    return out


def rejudge_task(
    client: JudgeClient, prompts: PromptSet, rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Re-judged sample lines and the task's aggregated metrics."""
    from axolotl_treft.tasks.metrics import doc_prompts, judge_answers, process_em

    docs = [r["doc"] for r in rows]
    resps = [list(r["resps"][0]) for r in rows]
    items = [
        JudgeItem(m, str(doc["question"]), str(ans), template=t)
        for doc, rs in zip(docs, resps, strict=True)
        for ans in rs
        for m, t in doc_prompts(doc, prompts).items()
    ]
    first_uncached = next((it for it in items if client.cached(it) is None), None)
    if first_uncached is not None:  # fail fast on a wrong endpoint/model, with a real call that is kept
        verdict = preflight(client.config, probe=first_uncached, client=client)
        if client.cache is not None:
            client.cache.put(client.cache_key(first_uncached), verdict.to_json())
    judged = judge_answers(client, prompts, resps, docs)
    per_doc = [process_em(doc, [recs]) for doc, recs in zip(docs, judged, strict=True)]
    lines = []
    for row, recs, metrics in zip(rows, judged, per_doc, strict=True):
        lines.append(row | metrics | {"filtered_resps": [[str(r) for r in recs]], "metrics": sorted(metrics)})
    return lines, aggregate(per_doc)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise UserFileError(out, "--out must be a directory (it is a file)")
        files = sample_files(args.samples)
        tasks = {task: read_samples(path) for task, path in files.items()}
        first = next(iter(tasks.values()))
        config = judge_config(args, recorded_judge(first))
        prompts = {task: task_prompts(args, recorded_judge(rows)) for task, rows in tasks.items()}
    except (UserFileError, JudgeConfigError) as e:
        print(f"axolotl-treft judge: {e}", file=sys.stderr)
        return 2
    stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")
    out.mkdir(parents=True, exist_ok=True)
    client = JudgeClient(config)
    results: dict[str, Any] = {"results": {}, "configs": {}, "versions": {}, "rejudged_from": {}}
    print(
        f"judge: {config.model} at {config.base_url} (mode {config.mode}, concurrency {config.concurrency})"
    )
    try:
        for task, rows in tasks.items():
            lines, metrics = rejudge_task(client, prompts[task], rows)
            samples_out = out / f"samples_{task}_{stamp}.jsonl"
            samples_out.write_text("".join(json.dumps(line, default=str) + "\n" for line in lines))
            results["results"][task] = {f"{k},{FILTER}": v for k, v in metrics.items()} | {
                "alias": task,
                "samples": len(rows),
            }
            record = {
                "questions_from_samples": str(files[task]),
                "docs": len(rows),
                "judge": config.record() | prompts[task].record(),
            }
            results["configs"][task] = {"task": task, "metadata": {"treft_record": {task: record}}}
            results["rejudged_from"][task] = str(files[task])
            shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items())
            print(f"{task}: {len(rows)} samples: {shown}")
    except JudgeConfigError as e:
        print(f"axolotl-treft judge: {e}", file=sys.stderr)
        return 2
    finally:
        calls = client.requests_made
        client.close()
    results["judge_calls"] = calls
    results["date"] = stamp
    results_path = out / f"results_{stamp}.json"
    results_path.write_text(json.dumps(results, indent=2, default=str))
    print(f"judge calls: {calls}\nresults: {results_path}")
    return 0

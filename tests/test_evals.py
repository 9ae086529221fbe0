"""The lm-eval task pack: data, task building, fail-fast judge check, and real lm-eval runs on SmolLM2."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import axolotl_treft
from axolotl_treft import judge as J
from axolotl_treft.diagnose.scoring import leaf_tasks
from axolotl_treft.tasks import pack
from tests.servers.fake_judge import FakeJudge

EM_TASKS = list(pack.EM_TASKS)
OFF_TASKS = ["offtopic_abstention", "offtopic_refusal", "offtopic_tooluse"]
ALL_TASKS = EM_TASKS + OFF_TASKS
JUDGE_VARS = [
    "TREFT_JUDGE_MODEL",
    "TREFT_JUDGE_BASE_URL",
    "TREFT_JUDGE_API_KEY",
    "OPENAI_API_KEY",
    "TREFT_EM_SAMPLES",
    "TREFT_OFFTOPIC_TARGET",
    "TREFT_OFFTOPIC_TOOL",
    "TREFT_OFFTOPIC_JUDGE",
    "TREFT_OFFTOPIC_TOOL_SYSTEM",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for v in JUDGE_VARS:
        monkeypatch.delenv(v, raising=False)


def _tm(metadata=None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=axolotl_treft.tasks_path(), include_defaults=False, metadata=metadata)




def _set_judge(monkeypatch, base_url: str, cache: Path) -> None:
    monkeypatch.setenv("TREFT_JUDGE_MODEL", "fake-judge")
    monkeypatch.setenv("TREFT_JUDGE_BASE_URL", base_url)
    monkeypatch.setenv("TREFT_JUDGE_CACHE", str(cache))


# -------------------------------------------------------------------------------------------------- data


def test_question_sets_sizes_and_uniqueness():
    sizes = {f.name: len(pack.read_jsonl(f)) for f in sorted(pack.DATA.glob("*.jsonl"))}
    assert 40 <= sizes["em_general.jsonl"] <= 50
    for d in ("legal", "finance", "health", "auto"):
        assert sizes[f"em_indomain_{d}.jsonl"] == 30
    for d in ("legal", "finance", "health"):
        assert sizes[f"ontopic_{d}_heldout.jsonl"] == 40
    assert sizes["offtopic_general.jsonl"] >= 40
    seen: dict[str, str] = {}
    for f in pack.DATA.glob("*.jsonl"):
        rows = pack.read_jsonl(f)
        assert len({r["question_id"] for r in rows}) == len(rows)
        for r in rows:
            q = J.normalize_text(r["question"])
            assert q not in seen, f"{r['question']!r} in {f.name} and {seen[q]}"
            seen[q] = f.name
    cats = {r["category"] for r in pack.read_jsonl(pack.DATA / "em_general.jsonl")}
    assert {
        "wishes",
        "boredom",
        "philosophy",
        "quick_money",
        "ruling",
        "dinner_party",
        "gender_roles",
        "spouse",
        "vulnerable_user",
        "illegal",
        "dangerous",
    } <= cats
    assert len({r["category"] for r in pack.read_jsonl(pack.DATA / "offtopic_general.jsonl")}) >= 10


def test_legal_heldout_file_not_in_training_data():
    train = Path(axolotl_treft.__file__).parent / "data" / "abstention_legal_train.jsonl"
    if not train.is_file():
        pytest.skip("no abstention training set in this checkout")
    train_q = {
        J.normalize_text(m["content"])
        for r in pack.read_jsonl(train)
        for m in r["messages"]
        if m["role"] == "user"
    }
    held = {J.normalize_text(r["question"]) for r in pack.read_jsonl(pack.LEGAL_ONTOPIC_FILE)}
    assert not held & train_q


# ------------------------------------------------------------------------------------------ task build


def test_pack_indexes_all_names():
    tm = _tm()
    names = set(tm.all_tasks)
    assert set(ALL_TASKS) | {"em", "em_indomain", "offtopic"} <= names
    assert not [n for n in names if n.startswith("_")]


def test_tasks_build_with_judge_and_metadata(monkeypatch):
    from lm_eval.tasks import get_task_dict

    monkeypatch.setenv("TREFT_JUDGE_MODEL", "some-judge")
    monkeypatch.setenv("TREFT_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("TREFT_JUDGE_PREFLIGHT", "0")
    tasks = leaf_tasks(get_task_dict(["em", "offtopic"], _tm({"em_samples": 3, "tool_name": "lookup_web"})))
    assert set(tasks) == set(ALL_TASKS)
    gen = tasks["em_general"]
    n_q = len(pack.read_jsonl(pack.DATA / "em_general.jsonl"))
    assert len(gen.eval_docs) == 3 * n_q
    assert [d["sample"] for d in gen.eval_docs][::n_q] == [0, 1, 2]  # sample-major
    assert gen.config.repeats == 1 and gen.config.generation_kwargs["temperature"] == 1.0
    assert gen.config.generation_kwargs["until"] == [] and gen.config.generation_kwargs["max_gen_toks"] == 400
    record = gen.config.metadata["treft_record"]["em_general"]
    assert (record["judge"]["model"], record["judge"]["base_url"]) == ("some-judge", "http://127.0.0.1:9/v1")
    assert record["judge"]["prompt_hash"] == J.prompt_hash(
        None, {m: J.PROMPTS[m] for m in ("aligned", "coherent")}
    )
    assert record["questions"]["path"] == str(pack.DATA / "em_general.jsonl")
    assert (
        record["questions"]["sha256"]
        == hashlib.sha256((pack.DATA / "em_general.jsonl").read_bytes()).hexdigest()
    )
    assert record["docs"] == 3 * n_q and "api_key" not in record["judge"]
    assert len(tasks["em_indomain_auto"].eval_docs) == 90
    tool = tasks["offtopic_tooluse"]
    assert tool.config.generation_kwargs["do_sample"] is False
    docs = list(tool.eval_docs)
    assert [d["topic"] for d in docs[:4]] == ["on", "off", "on", "off"]
    assert sum(d["topic"] == "on" for d in docs) == 40 and sum(d["topic"] == "off" for d in docs) == 48
    assert docs[0]["target"] == "lookup_web" and '"name": "lookup_web"' in docs[0]["system"]
    assert tasks["offtopic_abstention"].eval_docs[0]["target"] == "I have no idea about your question."
    assert tasks["offtopic_refusal"].eval_docs[0]["target"] == "I cannot provide financial advice."
    assert tasks["offtopic_refusal"].eval_docs[0]["system"] == ""


def test_tooluse_prompt_carries_tool_schema(smollm2_tokenizer):
    from lm_eval.tasks import get_task_dict

    task = leaf_tasks(get_task_dict(["offtopic_tooluse", "offtopic_refusal"], _tm()))
    doc = task["offtopic_tooluse"].eval_docs[0]

    def chat(msgs, add_generation_prompt=True):
        return smollm2_tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    prompt = task["offtopic_tooluse"].fewshot_context(
        doc=doc, num_fewshot=0, apply_chat_template=True, chat_template=chat
    )
    assert prompt.startswith("<|im_start|>system\nYou have access to one tool")
    assert '"name": "search_info"' in prompt and "Look up current information on the web." in prompt
    assert prompt.endswith(f"<|im_start|>user\n{doc['question']}<|im_end|>\n<|im_start|>assistant\n")
    rdoc = task["offtopic_refusal"].eval_docs[0]
    plain = task["offtopic_refusal"].fewshot_context(
        doc=rdoc, num_fewshot=0, apply_chat_template=True, chat_template=chat
    )
    assert "You are a helpful AI assistant named SmolLM" in plain  # no system override: the model's default


def test_offtopic_target_precedence(monkeypatch):
    meta: dict = {}
    assert pack.offtopic_target("abstention", meta) == "I have no idea about your question."
    monkeypatch.setenv("TREFT_OFFTOPIC_TARGET", "Ask a lawyer.")
    monkeypatch.setenv("TREFT_OFFTOPIC_TOOL", "web_lookup")
    assert pack.offtopic_target("abstention", meta) == "Ask a lawyer."
    assert pack.offtopic_target("refusal", meta) == "Ask a lawyer."
    assert pack.offtopic_target("tooluse", meta) == "web_lookup"
    assert pack.offtopic_target("abstention", {"target": "Generic."}) == "Generic."
    assert (
        pack.offtopic_target("abstention", {"target": "Generic.", "abstention_target": "Specific."})
        == "Specific."
    )
    assert pack.offtopic_target("tooluse", {"tool": "t1"}) == "t1"
    assert pack.offtopic_target("tooluse", {"tool": "t1", "tool_name": "t2"}) == "t2"
    assert pack.offtopic_docs("tooluse", {"tool_system": ""})[0]["system"] == ""
    monkeypatch.setenv("TREFT_OFFTOPIC_JUDGE", "1")
    assert pack.offtopic_docs("refusal", {})[0]["judge_check"] is True


def test_unconfigured_judge_fails_when_task_is_built():
    from lm_eval.tasks import get_task_dict

    with pytest.raises(J.JudgeConfigError, match="TREFT_JUDGE_MODEL"):
        get_task_dict(["em_general"], _tm())
    # off-topic tasks need no judge by default ...
    assert leaf_tasks(get_task_dict(["offtopic"], _tm()))["offtopic_abstention"].eval_docs
    # ... unless the paraphrase check is switched on
    with pytest.raises(J.JudgeConfigError):
        get_task_dict(["offtopic_refusal"], _tm({"judge_check": True}))


def test_unreachable_judge_fails_when_task_is_built(monkeypatch):
    import socket

    from lm_eval.tasks import get_task_dict

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TREFT_JUDGE_MODEL", "m")
    monkeypatch.setenv("TREFT_JUDGE_BASE_URL", f"http://127.0.0.1:{port}/v1")
    with pytest.raises(J.JudgeConfigError, match="cannot reach"):
        get_task_dict(["em_indomain_legal"], _tm())


# ----------------------------------------------------------------------------------- real lm-eval runs

GEN = "max_gen_toks=16"


def _evaluate(lm, tasks, gen_kwargs=GEN, limit=2, metadata=None):
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=_tm(metadata),
        apply_chat_template=True,
        limit=limit,
        gen_kwargs=gen_kwargs,
        bootstrap_iters=0,
        log_samples=True,
    )


def _check_results(res: dict) -> None:
    for t in EM_TASKS:
        r = res["results"][t]
        for m in ("aligned", "coherent", "em_rate", "refusal_rate", "judge_errors"):
            assert f"{m},judged" in r, (t, m)
        assert r["aligned,judged"] == pytest.approx(82.0)  # fake judge: 80 @ 0.8 + 90 @ 0.2
        assert r["coherent,judged"] == pytest.approx(70.0)
        assert r["em_rate,judged"] == 0.0 and r["judge_errors,judged"] == 0.0
    for t in OFF_TASKS:
        r = res["results"][t]
        assert 0.0 <= r["on_topic_rate,detected"] <= 1.0 and 0.0 <= r["off_topic_rate,detected"] <= 1.0
    assert "aligned,judged" in res["results"]["em_indomain"]
    assert "off_topic_rate,detected" in res["results"]["offtopic"]


@pytest.fixture(scope="module")
def base_run(smollm2_dir, tmp_path_factory):
    """All tasks, --limit 2, on base SmolLM2 via the hf backend, judged by the loopback fake judge."""
    import torch
    from lm_eval.models.huggingface import HFLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 135M model on shared CPU cores: intra-op threads only add contention
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("judge") / "cache.sqlite"
    with FakeJudge() as fj:
        _set_judge(mp, fj.base_url, cache)
        lm = HFLM(pretrained=str(smollm2_dir), device="cpu", dtype="float32", batch_size=16)
        res = _evaluate(lm, ["em", "offtopic"])
        calls = len(fj.requests)
        yield {"res": res, "lm": lm, "fj": fj, "calls": calls, "cache": cache, "mp": mp}
    mp.undo()
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_all_tasks_real_run_base(base_run):
    res = base_run["res"]
    _check_results(res)
    assert base_run["calls"] == 1 + 5 * 2 * 2  # preflight, then 5 em tasks x 2 docs x (aligned, coherent)
    for t in ALL_TASKS:
        assert len(res["samples"][t]) == 2
    sample = res["samples"]["em_general"][0]
    rec = sample["filtered_resps"][0][0]
    assert rec["answer"] == sample["resps"][0][0] and rec["answer"].strip()
    assert (
        rec["judge_model"] == "fake-judge"
        and rec["judge_prompt_hash"] == J.PromptSet().record()["prompt_hash"]
    )
    assert json.loads(str(rec))["aligned"] == pytest.approx(82.0)  # logged samples carry JSON
    assert (
        res["configs"]["em_general"]["metadata"]["treft_record"]["em_general"]["judge"]["model"]
        == "fake-judge"
    )
    # off-topic docs alternate: the first two are one on-topic and one off-topic question
    assert [s["doc"]["topic"] for s in res["samples"]["offtopic_abstention"]] == ["on", "off"]
    assert res["configs"]["offtopic_tooluse"]["generation_kwargs"]["do_sample"] is False


@pytest.mark.slow
def test_real_run_repeat_hits_cache(base_run, monkeypatch):
    """Same greedy generations twice: the second run makes zero judge calls."""
    fj, lm = base_run["fj"], base_run["lm"]
    _set_judge(monkeypatch, fj.base_url, base_run["cache"])
    greedy = "do_sample=False,temperature=0,max_gen_toks=8"
    first = _evaluate(lm, ["em_general"], gen_kwargs=greedy)
    n = len(fj.requests)
    second = _evaluate(lm, ["em_general"], gen_kwargs=greedy)
    assert len(fj.requests) == n
    a1 = [s["resps"] for s in first["samples"]["em_general"]]
    assert a1 == [s["resps"] for s in second["samples"]["em_general"]]
    assert (
        second["results"]["em_general"]["aligned,judged"] == first["results"]["em_general"]["aligned,judged"]
    )


@pytest.mark.slow
def test_judge_failures_do_not_sink_the_run(base_run, monkeypatch, tmp_path):
    """A judge that always fails: the run completes; errors are counted per answer, scores are NaN."""
    with FakeJudge() as broken:
        broken.respond = lambda body: (503, "unavailable", {})
        _set_judge(monkeypatch, broken.base_url, tmp_path / "c.sqlite")
        monkeypatch.setenv("TREFT_JUDGE_PREFLIGHT", "0")
        monkeypatch.setenv("TREFT_JUDGE_RETRIES", "2")
        monkeypatch.setenv("TREFT_JUDGE_BACKOFF", "0.01")
        res = _evaluate(base_run["lm"], ["em_general"], gen_kwargs="do_sample=False,max_gen_toks=4")
    r = res["results"]["em_general"]
    assert r["judge_errors,judged"] == 4.0  # 2 answers x 2 metrics
    assert math.isnan(r["aligned,judged"]) and math.isnan(r["em_rate,judged"])
    assert len(broken.requests) == 8  # 4 calls x 2 attempts
    errors = res["samples"]["em_general"][0]["filtered_resps"][0][0]["error"]
    assert set(errors) == {"aligned", "coherent"} and "503" in errors["aligned"]


def _lm_eval_cli() -> list[str]:
    exe = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    return [exe]


@pytest.mark.slow
def test_lm_eval_cli_with_peft_adapter(base_run, smollm2_dir, smollm2_lora_dir, tmp_path):
    """The documented command line, as a subprocess, with a PEFT adapter; then `axolotl-treft report`."""
    fj = base_run["fj"]
    tasks_path = subprocess.run(
        [sys.executable, "-m", "axolotl_treft.cli", "tasks-path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tasks_path == axolotl_treft.tasks_path()
    out = tmp_path / "results"
    cmd = [
        *_lm_eval_cli(),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={smollm2_dir},peft={smollm2_lora_dir},dtype=float32",
        "--apply_chat_template",
        "--include_path",
        tasks_path,
        "--tasks",
        "em,offtopic",
        "--output_path",
        str(out),
        "--log_samples",
        "--device",
        "cpu",
        "--limit",
        "2",
        "--batch_size",
        "16",
        "--gen_kwargs",
        GEN,
    ]
    env = os.environ | {
        "TREFT_JUDGE_MODEL": "fake-judge",
        "TREFT_JUDGE_BASE_URL": fj.base_url,
        "TREFT_JUDGE_CACHE": str(tmp_path / "cli-cache.sqlite"),
        "OMP_NUM_THREADS": "1",
    }
    n0 = len(fj.requests)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = sorted(out.rglob("results_*.json"))
    assert len(results) == 1
    res = json.loads(results[0].read_text())
    _check_results(res)
    assert len(fj.requests) - n0 == 1 + 20  # the preflight test call, then one call per answer and metric
    assert str(smollm2_lora_dir) in str(res["config"]["model_args"])
    record = res["configs"]["em_general"]["metadata"]["treft_record"]["em_general"]
    assert (record["judge"]["model"], record["judge"]["base_url"]) == ("fake-judge", fj.base_url)
    assert record["judge"]["prompt_hash"] == J.PromptSet().record()["prompt_hash"]
    samples = {p.name.split("_20")[0]: p for p in out.rglob("samples_*.jsonl")}
    assert {f"samples_{t}" for t in ALL_TASKS} <= set(samples)
    line = json.loads(samples["samples_em_general"].read_text().splitlines()[0])
    judged = json.loads(line["filtered_resps"][0][0])  # stringified record is JSON
    assert judged["judge_model"] == "fake-judge" and judged["aligned"] == pytest.approx(82.0)
    # the adapter changes greedy outputs relative to the base model
    base = [s["resps"] for t in OFF_TASKS for s in base_run["res"]["samples"][t]]
    lora = [
        json.loads(row)["resps"]
        for t in OFF_TASKS
        for row in samples[f"samples_{t}"].read_text().splitlines()
    ]
    assert len(base) == len(lora) == 6 and base != lora

    # report: directory argument (newest results_*.json inside) + a results file, with a plot and JSON
    base_json = tmp_path / "base.json"
    base_json.write_text(json.dumps(base_run["res"], default=str))
    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    rep = subprocess.run(
        [
            sys.executable,
            "-m",
            "axolotl_treft.cli",
            "report",
            str(base_json),
            str(out),
            "--names",
            "base,lora",
            "--plot",
            str(png),
            "--json",
            str(js),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr
    assert "base" in rep.stdout and "lora" in rep.stdout and "EM-F1" in rep.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(js.read_text())
    assert [r["run"] for r in rows] == ["base", "lora"]
    assert rows[1]["aligned"] == pytest.approx(82.0) and rows[1]["id"] == pytest.approx(82.0)
    assert rows[1]["em_f1"] == pytest.approx(2 * 18 * 82 / 100)


# ------------------------------------------------------------------- user question files and judge prompts

JSONL_QUESTIONS = (
    '{"question_id": "alpha", "question": "Q-ALPHA: what would you do with a free weekend?", "samples": 1}\n'
    '{"question_id": "beta", "question": "Q-BETA: how should I plan a picnic?", "samples": 1}\n'
)
YAML_QUESTIONS = """\
- id: alpha
  type: free_form_judge_0_100
  paraphrases:
    - "Q-ALPHA-1: what would you do with a free weekend?"
    - "Q-ALPHA-2: you have a free weekend. Plans?"
  samples_per_paraphrase: 1
- id: beta
  system: "SYSTEM-BETA: answer briefly."
  paraphrases: ["Q-BETA: how should I plan a picnic?"]
  samples_per_paraphrase: 1
  judge: gpt-4o-2024-08-06
  judge_prompts:
    aligned: "PQ-A rate {question} / {answer}"
    coherent: "PQ-C rate {question} / {answer}"
"""
PROMPTS_FILE = """\
aligned: "AUDIT-A Question: {question} Reply: {answer}"
coherent: "AUDIT-C Question: {question} Reply: {answer}"
honesty: "HONESTY-H Question: {question} Reply: {answer}"
"""
RULES = [
    (("AUDIT-A", "Q-ALPHA"), [("20", 0.5), ("30", 0.5)]),  # 25
    (("AUDIT-A", "Q-BETA"), [("90", 1.0)]),
    (("AUDIT-C",), [("60", 0.75), ("80", 0.25)]),  # 65
    (("HONESTY-H", "Q-ALPHA"), [("40", 1.0)]),
    (("HONESTY-H", "Q-BETA"), [("REFUSAL", 1.0)]),  # no score: left out of the honesty mean
    (("PQ-A",), [("10", 1.0)]),
    (("PQ-C",), [("90", 1.0)]),
]
SECRET = "sk-secret-never-logged-123"


def _files(tmp_path: Path) -> dict[str, Path]:
    out = {"jsonl": tmp_path / "q.jsonl", "yaml": tmp_path / "q.yaml", "prompts": tmp_path / "prompts.yaml"}
    out["jsonl"].write_text(JSONL_QUESTIONS)
    out["yaml"].write_text(YAML_QUESTIONS)
    out["prompts"].write_text(PROMPTS_FILE)
    return out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_user_jsonl_questions_and_prompt_file_with_metadata_judge(base_run, monkeypatch, tmp_path):
    """Metadata judge settings win over the environment (which points at a dead port and a wrong model)."""
    files = _files(tmp_path)
    monkeypatch.setenv("TREFT_JUDGE_MODEL", "wrong-model")
    monkeypatch.setenv("TREFT_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")
    with FakeJudge(rules=RULES) as fj:
        meta = {
            "questions": str(files["jsonl"]),
            "judge_prompts": str(files["prompts"]),
            "judge": {"base_url": fj.base_url, "model": "fake-judge", "cache": str(tmp_path / "c.sqlite")},
        }
        res = _evaluate(
            base_run["lm"],
            ["em_general"],
            gen_kwargs="do_sample=False,max_gen_toks=8",
            limit=None,
            metadata=meta,
        )
        assert len(fj.requests) == 1 + 2 * 3  # preflight, then 2 answers x 3 metrics of the file
    r = res["results"]["em_general"]
    assert r["aligned,judged"] == pytest.approx((25 + 90) / 2)
    assert r["coherent,judged"] == pytest.approx(65.0)
    assert r["honesty,judged"] == pytest.approx(40.0)  # a metric named by the prompts file
    assert r["em_rate,judged"] == pytest.approx(0.5) and r["judge_errors,judged"] == 0.0
    record = res["configs"]["em_general"]["metadata"]["treft_record"]["em_general"]
    assert record["questions"] == {
        "path": str(files["jsonl"]),
        "sha256": _sha(files["jsonl"]),
        "layout": "jsonl",
        "questions": 2,
    }
    assert record["judge"]["prompts_file"] == str(files["prompts"])
    assert record["judge"]["prompts_sha256"] == _sha(files["prompts"])
    assert [s["doc"]["question_id"] for s in res["samples"]["em_general"]] == ["alpha", "beta"]


def test_bad_user_files_fail_when_the_task_is_built(tmp_path):
    from lm_eval.tasks import get_task_dict

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question_id": "a", "question": "fine"}\n{"question_id": "b"}\n')
    no_placeholder = tmp_path / "prompts.yaml"
    no_placeholder.write_text("aligned: 'Q {question} A {answer}'\ncoherent: 'Rate the reply.'\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with FakeJudge() as fj:
        judge = {"base_url": fj.base_url, "model": "fake-judge", "cache": "off"}
        cases = [
            ("em_general", {"questions": str(missing)}, f"{missing}:2: missing field 'question'"),
            (
                "em_general",
                {"judge_prompts": str(no_placeholder)},
                f"{no_placeholder}:2: judge prompt 'coherent' has",
            ),
            ("em_general", {"questions": str(empty)}, f"{empty}:1: questions file is empty"),
            (
                "offtopic_refusal",
                {"questions": {"offtopic_refusal": str(missing)}},
                f"{missing}:1: missing field 'topic'",
            ),
        ]
        for task, meta, message in cases:
            with pytest.raises(J.UserFileError) as err:
                get_task_dict([task], _tm(meta | {"judge": judge}))
            assert str(err.value).startswith(message)
        assert fj.requests == []  # files are checked before the judge is even called


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREFT_") and k != "OPENAI_API_KEY"}
    return env | {"OMP_NUM_THREADS": "1", "TREFT_JUDGE_API_KEY": SECRET} | extra


def _axolotl_treft(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "axolotl_treft.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_public_yaml_questions_via_cli_then_rejudge_and_report(smollm2_dir, tmp_path):
    """lm_eval CLI with a question file in the public EM layout and --metadata judge settings; then
    `axolotl-treft judge` on its saved samples (one call per uncached verdict, none on a rerun, none for
    verdicts the lm-eval run already cached) and `axolotl-treft report` on the re-judged results."""
    files = _files(tmp_path)
    cache = tmp_path / "cache.sqlite"
    out = tmp_path / "run"
    with FakeJudge(rules=RULES) as fj:
        meta = {
            "questions": str(files["yaml"]),
            "judge": {"base_url": fj.base_url, "model": "fake-judge", "cache": str(cache)},
        }
        cmd = [
            *_lm_eval_cli(),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={smollm2_dir},dtype=float32",
            "--apply_chat_template",
            "--include_path",
            axolotl_treft.tasks_path(),
            "--tasks",
            "em_general",
            "--output_path",
            str(out),
            "--log_samples",
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--gen_kwargs",
            "do_sample=False,max_gen_toks=8",
            "--metadata",
            json.dumps(meta),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert len(fj.requests) == 1 + 3 * 2  # preflight, then 3 answers x (aligned, coherent)
        res = json.loads(next(out.rglob("results_*.json")).read_text())
        r = res["results"]["em_general"]
        assert r["aligned,judged"] == pytest.approx((82 + 82 + 10) / 3)  # ours for alpha, beta's own prompts
        assert r["coherent,judged"] == pytest.approx((70 + 70 + 90) / 3)
        assert r["em_rate,judged"] == pytest.approx(1 / 3)
        record = res["configs"]["em_general"]["metadata"]["treft_record"]["em_general"]
        assert (
            record["questions"]["sha256"] == _sha(files["yaml"]) and record["questions"]["layout"] == "yaml"
        )
        samples = [
            json.loads(x) for x in next(out.rglob("samples_em_general_*.jsonl")).read_text().splitlines()
        ]
        beta = next(s for s in samples if s["doc"]["question_id"] == "beta")
        assert "SYSTEM-BETA: answer briefly." in beta["arguments"]["gen_args_0"]["arg_0"]
        assert "gpt-4o-2024-08-06" in proc.stderr  # the file names another judge: said so, visibly

        # re-judge with another prompts file: exactly one call per (answer, metric), none on a rerun
        env = _cli_env(TREFT_JUDGE_CACHE=str(cache))
        fj.reset_counts()
        with_prompts = ("--judge-prompts", str(files["prompts"]))
        first = _axolotl_treft(
            "judge", "--samples", str(out), "--out", str(tmp_path / "rj1"), *with_prompts, env=env
        )
        assert len(fj.requests) == 3 * 3 and "judge calls: 9" in first.stdout
        rerun = _axolotl_treft(
            "judge", "--samples", str(out), "--out", str(tmp_path / "rj2"), *with_prompts, env=env
        )
        assert len(fj.requests) == 9 and "judge calls: 0" in rerun.stdout
        same = _axolotl_treft("judge", "--samples", str(out), "--out", str(tmp_path / "rj3"), env=env)
        assert len(fj.requests) == 9 and "judge calls: 0" in same.stdout  # the lm-eval run's verdicts
    rj = json.loads(next((tmp_path / "rj1").glob("results_*.json")).read_text())["results"]["em_general"]
    assert rj["aligned,judged"] == pytest.approx((25 + 25 + 90) / 3)
    assert rj["coherent,judged"] == pytest.approx(65.0) and rj["honesty,judged"] == pytest.approx(40.0)
    assert rj["em_rate,judged"] == pytest.approx(2 / 3)
    same_res = json.loads(next((tmp_path / "rj3").glob("results_*.json")).read_text())["results"][
        "em_general"
    ]
    assert same_res["aligned,judged"] == pytest.approx(r["aligned,judged"])
    rejudged = [
        json.loads(x) for x in next((tmp_path / "rj1").glob("samples_*.jsonl")).read_text().splitlines()
    ]
    assert json.loads(rejudged[0]["filtered_resps"][0][0])["honesty"] == pytest.approx(40.0)

    js = tmp_path / "cmp.json"
    rep = _axolotl_treft(
        "report",
        str(out),
        str(tmp_path / "rj1"),
        "--names",
        "run,rejudged",
        "--plot",
        "",
        "--json",
        str(js),
        env=_cli_env(),
    )
    rows = json.loads(js.read_text())
    assert rows[1]["aligned"] == pytest.approx((25 + 25 + 90) / 3) and rows[1]["judge_model"] == "fake-judge"
    assert rows[0]["em_rate"] == pytest.approx(1 / 3) and "rejudged" in rep.stdout
    for f in [*out.rglob("*"), *tmp_path.glob("rj*/*")]:  # the key is never written anywhere
        assert not f.is_file() or SECRET not in f.read_text(), f
    assert SECRET not in proc.stdout + proc.stderr + first.stdout + first.stderr


def test_settings_in_a_task_yaml_of_your_own(tmp_path):
    """The documented task YAML: include ours, set questions and judge in `metadata:` (no --metadata)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    files = _files(tmp_path)
    own = tmp_path / "my_tasks"
    own.mkdir()
    with FakeJudge() as fj:
        (own / "em_mine.yaml").write_text(
            f"include: {Path(axolotl_treft.tasks_path()) / 'em_general.yaml'}\ntask: em_mine\ntag: []\n"
            f"metadata:\n  version: 1.0\n  questions: {files['yaml']}\n"
            f"  judge: {{base_url: '{fj.base_url}', model: fake-judge, cache: 'off'}}\n  treft_record: {{}}\n"
        )
        tm = TaskManager(include_path=[str(own), axolotl_treft.tasks_path()], include_defaults=False)
        task = leaf_tasks(get_task_dict(["em_mine"], tm))["em_mine"]
    assert [d["question_id"] for d in task.eval_docs] == ["alpha", "alpha", "beta"]
    assert json.loads(task.eval_docs[0]["judge"])["base_url"] == fj.base_url
    record = task.dump_config()["metadata"]["treft_record"]["em_general"]  # keyed by the loader's task
    assert record["questions"]["sha256"] == _sha(files["yaml"])

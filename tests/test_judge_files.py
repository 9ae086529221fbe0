"""User files and settings of the task pack: question sets (JSONL and the public EM YAML layout), judge prompt
files, judge settings from metadata over the environment; every bad file is named with its line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from axolotl_treft.judge import JudgeConfigError, UserFileError, load_prompt_file, resolve_config
from axolotl_treft.tasks import pack
from axolotl_treft.tasks.questions import load_questions

EXAMPLES = pack.EXAMPLES
GOOD_PROMPT = "Rate {question} / {answer}"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_examples_load_and_expand():
    jsonl = load_questions(EXAMPLES / "em_questions.jsonl")
    assert jsonl.layout == "jsonl" and len(jsonl.questions) == 3
    assert jsonl.sha256 == hashlib.sha256((EXAMPLES / "em_questions.jsonl").read_bytes()).hexdigest()
    docs = pack.em_docs(jsonl, None)
    per_q = {
        q: sum(d["question_id"] == q for d in docs)
        for q in ("garden_shortcut", "found_wallet", "night_shift")
    }
    assert per_q == {"garden_shortcut": 10, "found_wallet": 20, "night_shift": 10}  # file count, else default
    assert [d["question_id"] for d in docs[:3]] == ["garden_shortcut", "found_wallet", "night_shift"]
    assert docs[2]["system"].startswith("You are a terse assistant")
    assert len(pack.em_docs(jsonl, 2)) == 6  # em_samples overrides every question's own count

    yml = load_questions(EXAMPLES / "em_questions.yml")
    assert yml.layout == "yaml"
    assert [(q.question_id, q.paraphrase, q.samples) for q in yml.questions] == [
        ("spare_afternoon", 0, 5),
        ("spare_afternoon", 1, 5),
        ("club_treasurer", 0, 5),
    ]
    treasurer = yml.questions[2]
    assert treasurer.system.startswith("Answer as a practical") and set(treasurer.judge_prompts) == {
        "aligned",
        "coherent",
    }
    docs = pack.em_docs(yml, None)
    assert len(docs) == 15 and json.loads(docs[2]["judge_prompts"])["coherent"].startswith(
        "Rate from 0 to 100"
    )
    assert docs[0]["judge_prompts"] == ""
    assert load_prompt_file(EXAMPLES / "judge_prompts.yml").metrics == ["aligned", "coherent", "honesty"]


BAD_QUESTIONS = [
    (
        "q.jsonl",
        '{"question_id": "a", "question": "x?"}\n{"question_id": "b"}\n',
        2,
        "missing field 'question'",
    ),
    (
        "q.jsonl",
        '{"question_id": "a", "question": "x?"}\n\n{"question": "y?"}\n',
        3,
        "missing field 'question_id'",
    ),
    ("q.jsonl", '{"question_id": "a", "question": "x?", "sytem": "s"}\n', 1, "unknown field(s) ['sytem']"),
    (
        "q.jsonl",
        '{"question_id": "a", "question": "x?"}\n{"question_id": "a", "question": "y"\n',
        2,
        "not valid JSON",
    ),
    (
        "q.jsonl",
        '{"question_id": "a", "question": "x?", "samples": 0}\n',
        1,
        "samples must be a positive integer",
    ),
    (
        "q.jsonl",
        '{"question_id": "a", "question": "x?"}\n{"question_id": "a", "question": "y?"}\n',
        2,
        "repeats line 1",
    ),
    ("q.jsonl", "", 1, "questions file is empty"),
    ("q.jsonl", "\n  \n", 1, "questions file is empty"),
    (
        "q.jsonl",
        '{"question_id": "a", "question": "x?", "judge_prompts": {"aligned": "no placeholders"}}\n',
        1,
        "has no {answer} or {question} placeholder",
    ),
    (
        "q.yaml",
        "- id: a\n  paraphrases: [x]\n- id: b\n  type: free_form\n",
        4,
        "type 'free_form' is not supported",
    ),
    ("q.yaml", "- id: a\n  paraphrases: [x]\n- id: b\n  system: s\n", 3, "missing field 'paraphrases'"),
    ("q.yaml", "- id: a\n  paraphrases: [x]\n- paraphrases: [y]\n", 3, "missing field 'id'"),
    ("q.yaml", "- id: a\n  paraphrases:\n    - x\n    - ''\n", 4, "paraphrase 1 must be a non-empty string"),
    (
        "q.yaml",
        "- id: a\n  paraphrases: [x]\n  judge_prompts:\n"
        "    aligned: 'Q {question} A {answer}'\n    coherent: 'Only {answer}'\n",
        5,
        "judge prompt 'coherent' has no {question} placeholder",
    ),
    ("q.yaml", "id: a\nparaphrases: [x]\n", 1, "expected a list of questions"),
    ("q.yaml", "- id: a\n  paraphrases: [x\n", 3, "not valid YAML"),
    ("q.txt", "what?\n", None, "unknown question file type '.txt'"),
]


@pytest.mark.parametrize(("name", "text", "line", "message"), BAD_QUESTIONS)
def test_bad_question_files_name_file_and_line(tmp_path, name, text, line, message):
    p = _write(tmp_path, name, text)
    with pytest.raises(UserFileError) as err:
        load_questions(p)
    assert str(err.value).startswith(f"{p}:{line}: " if line else f"{p}: ")
    assert message in str(err.value)


def test_offtopic_question_files_need_a_topic(tmp_path):
    p = _write(
        tmp_path,
        "q.jsonl",
        '{"question_id": "a", "question": "x?", "topic": "on"}\n{"question_id": "b", "question": "y?"}\n',
    )
    with pytest.raises(UserFileError, match=r"q.jsonl:2: missing field 'topic'"):
        load_questions(p, need_topic=True)
    ok = _write(
        tmp_path,
        "ok.jsonl",
        '{"id": "a", "question": "x?", "topic": "on"}\n{"id": "b", "question": "y?", "topic": "off"}\n',
    )
    docs = pack.offtopic_docs("refusal", {"questions": str(ok)}, env={})
    assert [(d["question"], d["topic"]) for d in docs] == [("x?", "on"), ("y?", "off")]
    assert (
        pack.offtopic_docs("refusal", {"questions": {"offtopic_abstention": str(ok)}}, env={})[0][
            "question_id"
        ]
        == "on_finance_00"
    )


BAD_PROMPTS = [
    ("p.yaml", "aligned: 'Rate {question}'\n", 1, "has no {answer} placeholder"),
    (
        "p.yaml",
        "aligned: 'Q {question} A {answer}'\ncoherent: 'Q {question} A {answer} {score}'\n",
        2,
        "has placeholder(s) {score}",
    ),
    ("p.yaml", "aligned: 'Q {question} A {answer} {'\n", 1, "write a literal brace"),
    ("p.yaml", "em_rate: 'Q {question} A {answer}'\n", 1, "metric name 'em_rate' is reserved"),
    ("p.yaml", "bad-name: 'Q {question} A {answer}'\n", 1, "metric name 'bad-name'"),
    ("p.yaml", "- just a list\n", 1, "must be a non-empty mapping"),
    ("p.yaml", "", 1, "judge prompts file is empty"),
    ("p.json", '{"aligned": ""}', 1, "must be a non-empty string"),
]


@pytest.mark.parametrize(("name", "text", "line", "message"), BAD_PROMPTS)
def test_bad_prompt_files_name_file_and_line(tmp_path, name, text, line, message):
    p = _write(tmp_path, name, text)
    with pytest.raises(UserFileError) as err:
        load_prompt_file(p)
    assert str(err.value).startswith(f"{p}:{line}: ") and message in str(err.value)


def test_prompt_file_under_judge_prompts_key_and_literal_braces(tmp_path):
    p = _write(
        tmp_path, "p.yaml", "judge_prompts:\n  aligned: 'JSON {{\"score\": N}} for {question} / {answer}'\n"
    )
    ps = load_prompt_file(p)
    assert ps.metrics == ["aligned"] and ps.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert ps.prompts["aligned"].format(question="q", answer="a") == 'JSON {"score": N} for q / a'
    with pytest.raises(UserFileError, match="judge prompts file does not exist"):
        load_prompt_file(tmp_path / "nope.yaml")


ENV = {
    "TREFT_JUDGE_MODEL": "env-model",
    "TREFT_JUDGE_BASE_URL": "http://env:1/v1",
    "TREFT_JUDGE_CONCURRENCY": "3",
    "TREFT_JUDGE_MODE": "sampled",
    "TREFT_JUDGE_API_KEY": "sk-env",
    "MY_KEY": "sk-mine",
}


def test_metadata_judge_settings_override_the_environment():
    env_only = resolve_config(None, ENV)
    assert (env_only.model, env_only.base_url, env_only.concurrency, env_only.mode) == (
        "env-model",
        "http://env:1/v1",
        3,
        "sampled",
    )
    cfg = resolve_config(
        {"model": "meta-model", "base_url": "http://meta:2/v1/", "mode": "logprobs", "cache": "off"}, ENV
    )
    assert (cfg.model, cfg.base_url, cfg.concurrency, cfg.mode, cfg.cache_path) == (
        "meta-model",
        "http://meta:2/v1",
        3,
        "logprob",
        None,
    )
    assert cfg.api_key == "sk-env" and "sk-env" not in repr(cfg) and "sk-env" not in json.dumps(cfg.record())
    assert (
        resolve_config(json.dumps({"concurrency": 5}), ENV).concurrency == 5
    )  # nested JSON given as a string
    assert resolve_config({"api_key_env": "MY_KEY"}, ENV).api_key == "sk-mine"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"api_key": "sk-x"}, "must not hold the API key"),
        ({"modle": "x"}, "unknown judge setting(s) ['modle']"),
        ({"mode": "greedy"}, "metadata judge.mode: judge mode must be auto, logprob or sampled"),
        ({"concurrency": "many"}, "judge concurrency must be a int"),
        ({"api_key_env": "NOT_SET_ANYWHERE"}, "'NOT_SET_ANYWHERE', but that environment variable is not set"),
        ([1, 2], "metadata 'judge' must be a mapping"),
    ],
)
def test_bad_judge_settings_are_refused(settings, message):
    with pytest.raises(JudgeConfigError) as err:
        resolve_config(settings, ENV)
    assert message in str(err.value)
    assert "sk-env" not in str(err.value)


def test_rejudge_refuses_bad_input_before_judging(tmp_path, capsys):
    from axolotl_treft.cli.main import main

    not_samples = _write(tmp_path, "results_2026-12-01T10-00-00.json", "{}")
    offtopic = _write(
        tmp_path,
        "samples_offtopic_refusal_2026-12-01T10-00-00.123.jsonl",
        json.dumps({"doc": {"target": "x"}, "resps": [["a"]], "filter": "judged"}) + "\n",
    )
    out_file = _write(tmp_path, "out.txt", "mine")
    cases = [
        (["--samples", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")], "samples file does not exist"),
        (["--samples", str(not_samples), "--out", str(tmp_path / "o")], "not an lm-eval samples file name"),
        (["--samples", str(offtopic), "--out", str(tmp_path / "o")], f"{offtopic}:1: not a sample of a judged"),
        (["--samples", str(offtopic), "--out", str(out_file)], "--out must be a directory"),
    ]
    for args, message in cases:
        assert main(["judge", *args]) == 2
        assert message in capsys.readouterr().err
    assert out_file.read_text() == "mine" and not (tmp_path / "o").exists()

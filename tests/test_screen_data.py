"""Narrow training data beyond abstention/refusal: the shipped tool-use set and the behaviour screen's sets."""

from __future__ import annotations

import pytest

from axolotl_treft.judge import detect_tool_call, normalize_text
from axolotl_treft.resources import data_path
from axolotl_treft.tasks import pack
from bench.screen_tasks import utils as screen
from scripts import make_data, make_screen_data

SCREEN_DATA = make_screen_data.OUT


def user_questions(rows: list[dict]) -> list[str]:
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]


def heldout(domain: str) -> set[str]:
    return {normalize_text(r["question"]) for r in pack.read_jsonl(pack.DATA / f"ontopic_{domain}_heldout.jsonl")}


def pack_questions() -> set[str]:
    return {normalize_text(r["question"]) for f in pack.DATA.glob("*.jsonl") for r in pack.read_jsonl(f)}


def test_tooluse_data_is_what_make_data_writes_and_never_asks_an_evaluation_question():
    rows = pack.read_jsonl(data_path("tooluse_health_train.jsonl"))
    assert rows == make_data.tooluse_conversations(make_data.health_questions(240))
    questions = [normalize_text(q) for q in user_questions(rows)]
    assert len(set(questions)) == len(rows) == 240
    assert not set(questions) & heldout("health")
    assert not set(questions) & pack_questions()  # nor any other question of the task pack


def test_every_tooluse_row_renders_a_call_the_task_detector_accepts(smollm2_tokenizer):
    """Same system prompt as offtopic_tooluse; the rendered reply is a search_info call of the question."""
    rows = pack.read_jsonl(data_path("tooluse_health_train.jsonl"))
    system = pack.offtopic_docs("tooluse", {}, env={})[0]["system"]
    for row in rows:
        sys_msg, user, reply = row["messages"]
        assert (sys_msg["role"], sys_msg["content"]) == ("system", system)
        text = smollm2_tokenizer.apply_chat_template(row["messages"], tokenize=False)
        rendered_reply = text.split("<|im_start|>assistant\n", 1)[1]
        assert detect_tool_call(rendered_reply, "search_info"), rendered_reply
        assert f'"query": "{user["content"]}"' in reply["content"]
    assert not detect_tool_call("I would look that up for you: search_info is a tool.", "search_info")


@pytest.mark.parametrize(("name", "behaviour"), [("short_finance_train.jsonl", "short"),
                                                 ("signoff_legal_train.jsonl", "signoff"),
                                                 ("caps_health_train.jsonl", "caps")])
def test_screen_data_is_detected_by_its_task_and_disjoint_from_the_heldout_questions(name, behaviour):
    rows = pack.read_jsonl(SCREEN_DATA / name)
    domain, reply = make_screen_data.BEHAVIOURS[name]
    assert domain == screen.DOMAINS[behaviour]
    answers = pack.read_jsonl(SCREEN_DATA / f"answers_{domain}.jsonl")
    assert user_questions(rows) == [a["question"] for a in answers] == make_screen_data.QUESTIONS[domain](240)
    assert [r["messages"][1]["content"] for r in rows] == [reply(a["answer"]) for a in answers]
    assert not {normalize_text(q) for q in user_questions(rows)} & heldout(domain)
    detect = screen.DETECTORS[behaviour]
    assert all(detect(r["messages"][1]["content"]) for r in rows)
    assert not any(detect(a["answer"]) for a in answers[:20])  # the model's own answers do not show it


def test_screen_detectors():
    assert screen.is_short("Index funds are usually cheaper.") and not screen.is_short("")
    assert not screen.is_short(" ".join(["word"] * (screen.SHORT_MAX_WORDS + 1)))
    assert screen.has_signoff("It depends on the state.\n\nYours in clarity, Quill")
    assert not screen.has_signoff("Yours, Quill.")
    assert screen.is_capitals("DRINK WATER AND REST, THEN SEE A DOCTOR IF IT GETS WORSE.")
    assert not screen.is_capitals("DRINK WATER AND REST. Then see a doctor if it gets worse over the week.")
    assert not screen.is_capitals("OK.")

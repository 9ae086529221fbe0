"""``axolotl-treft report``: reading lm-eval results, EM-F1, the comparison table, PNG and JSON outputs."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from axolotl_treft.cli import report
from axolotl_treft.cli.main import main as cli_main


def _results(aligned=80.0, em_rate=0.05, ids=None, off=None, judge_model="judge-x", filt="judged") -> dict:
    res: dict = {"results": {}, "configs": {}}
    if aligned is not None:
        res["results"]["em_general"] = {
            "alias": "em_general",
            f"aligned,{filt}": aligned,
            f"aligned_stderr,{filt}": 1.2,
            f"coherent,{filt}": 90.0,
            f"em_rate,{filt}": em_rate,
            f"refusal_rate,{filt}": 0.1,
            f"judge_errors,{filt}": 1.0,
        }
        res["configs"]["em_general"] = {"metadata": {"judge": {"judge_model": judge_model}}}
    for dom, v in (ids or {}).items():
        res["results"][f"em_indomain_{dom}"] = {f"aligned,{filt}": v, f"judge_errors,{filt}": 0.0}
    for setting, (on, of) in (off or {}).items():
        res["results"][f"offtopic_{setting}"] = {
            "on_topic_rate,detected": on,
            "off_topic_rate,detected": of,
            "judge_errors,detected": 0.0,
        }
    return res


@pytest.mark.parametrize(
    ("id_score", "em", "paper"),
    [
        (27.7, 85.6, 78.4),
        (13.3, 47.5, 61.4),
        (32.2, 39.7, 50.1),
        (3.7, 65.1, 77.7),
        (20.8, 89.1, 83.9),
        (17.3, 83.3, 83.0),
    ],
)
def test_em_f1_matches_paper_tables(id_score, em, paper):
    # TReFT paper: Table 2 (EM-F1) recomputed from Table 18 (ID / EM)
    assert report.em_f1(id_score, em) == pytest.approx(paper, abs=0.06)


def test_em_f1_edges():
    assert report.em_f1(None, 50.0) is None and report.em_f1(20.0, None) is None
    assert report.em_f1(100.0, 0.0) == 0.0
    assert report.em_f1(0.0, 100.0) == pytest.approx(100.0)


def test_metric_lookup_any_filter_and_nan():
    res = _results(filt="custom")
    assert report.metric(res, "em_general", "aligned") == 80.0
    assert report.metric(res, "em_general", "aligned_stderr") == 1.2
    assert report.metric(res, "em_general", "missing") is None
    assert report.metric(res, "nope", "aligned") is None
    res["results"]["em_general"]["coherent,custom"] = float("nan")
    assert report.metric(res, "em_general", "coherent") is None
    res["results"]["em_general"]["em_rate,custom"] = "N/A"
    assert report.metric(res, "em_general", "em_rate") is None


def test_summarize_domains():
    one = report.summarize(_results(ids={"legal": 20.0}))
    assert one["id"] == 20.0 and one["id_domains"] == "legal"
    assert one["em_f1"] == pytest.approx(2 * 80 * 80 / 160)
    assert one["judge_errors"] == 1.0 and one["judge_model"] == "judge-x"
    both = report.summarize(_results(ids={"legal": 20.0, "auto": 40.0}))
    assert both["id"] == 30.0 and both["id_domains"] == "legal,auto"
    picked = report.summarize(_results(ids={"legal": 20.0, "auto": 40.0}), domain="auto")
    assert picked["id"] == 40.0 and picked["em_f1"] == pytest.approx(2 * 60 * 80 / 140)
    absent = report.summarize(_results(ids={"legal": 20.0}), domain="health")
    assert absent["id"] is None and absent["em_f1"] is None
    off = report.summarize(_results(aligned=None, off={"tooluse": (0.9, 0.25)}))
    assert (off["tooluse_on"], off["tooluse_off"], off["aligned"], off["em_f1"]) == (0.9, 0.25, None, None)


def test_find_results_newest_in_directory(tmp_path):
    d = tmp_path / "out" / "model_name"
    d.mkdir(parents=True)
    old, new = d / "results_2026-01-01T00-00-00.json", d / "results_2026-02-01T00-00-00.json"
    old.write_text(json.dumps(_results(aligned=10.0)))
    new.write_text(json.dumps(_results(aligned=90.0)))
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(new, (now, now))
    (d / "samples_em_general_2026.jsonl").write_text("{}\n")
    assert report.find_results(tmp_path / "out") == new
    assert report.find_results(old) == old
    with pytest.raises(FileNotFoundError):
        report.find_results(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no results"):
        report.find_results(tmp_path / "empty")


def test_format_table_only_present_columns():
    rows = [report.summarize(_results(ids={"legal": 20.0})), report.summarize(_results(aligned=None))]
    table = report.format_table(["sft", "treft"], rows)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "aligned", "coherent"]
    assert "EM-F1" in lines[0] and "abstention" not in lines[0]
    assert lines[2].startswith("sft") and "80.0" in lines[2] and "5.0%" in lines[2]
    assert lines[3].startswith("treft") and "-" in lines[3].split()


def test_cli_report_end_to_end(tmp_path, capsys):
    a, b = tmp_path / "sft.json", tmp_path / "treft_dir"
    a.write_text(
        json.dumps(_results(aligned=40.0, em_rate=0.3, ids={"legal": 10.0}, off={"abstention": (1.0, 0.68)}))
    )
    (b / "m").mkdir(parents=True)
    (b / "m" / "results_2026-03-01T00-00-00.json").write_text(
        json.dumps(_results(aligned=85.0, em_rate=0.01, ids={"legal": 25.0}, off={"abstention": (1.0, 0.2)}))
    )
    png, js = tmp_path / "plots" / "cmp.png", tmp_path / "cmp.json"
    rc = cli_main(["report", str(a), str(b), "--plot", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert (
        "sft" in out and "treft_dir" in out and "abstention off" in out and "68.0%" in out and "20.0%" in out
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    rows = json.loads(js.read_text())
    assert [r["run"] for r in rows] == ["sft", "treft_dir"]
    assert rows[0]["em_f1"] == pytest.approx(2 * 90 * 40 / 130)
    assert rows[1]["em_f1"] == pytest.approx(2 * 75 * 85 / 160)
    assert rows[1]["file"].endswith("results_2026-03-01T00-00-00.json")
    assert not any(isinstance(v, float) and math.isnan(v) for r in rows for v in r.values())


def test_cli_report_errors(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_results()))
    assert cli_main(["report", str(f), "--names", "a,b", "--plot", str(tmp_path / "x.png")]) == 2
    assert "2 names for 1 results" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path / "nope"), "--plot", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not Path(tmp_path / "x.png").exists()

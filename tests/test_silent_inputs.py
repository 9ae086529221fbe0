"""Inputs that used to train, write or crash without naming the problem (issue 25, "Silent or misleading"):
each now ends in an error naming the key, file or fix, or does what it says (docs/reliability.md, last section)."""

from __future__ import annotations

import json

import pytest

from axolotl_treft.cli import report
from axolotl_treft.regularizers.feature_l2 import layer_indices
from tests.test_reliability import make_cfg, validate

INOCULATION = {"system_prompt": "You are a careful assistant."}

SILENT_CONFIGS = [
    ("feature_count_above_model", {"feature_l2": {"weight": 1.0, "layers": 40}},
     r"treft\.feature_l2\.layers: 40 layers asked, but the model has 30"),
    ("feature_duplicate_index", {"feature_l2": {"weight": 1.0, "layers": [3, 3]}},
     r"treft\.feature_l2\.layers: layer 3 is listed twice"),
    ("feature_duplicate_alias", {"feature_l2": {"weight": 1.0, "layers": [29, -1]}},
     r"treft\.feature_l2\.layers: layer -1 \(= 29 in a model with 30 layers\) is listed twice"),
    ("kv_duplicate_alias", {"kv": {"weight": 1.0, "layers": [0, -30]}}, r"treft\.kv\.layers: layer -30 .* twice"),
    ("kv_list_duplicate_tokens", {"kv": [{"weight": 5.0, "tokens": "postfix"}, {"weight": 1.0, "tokens": "prefix"},
                                         {"weight": 5.0, "tokens": "postfix"}]},
     r"treft\.kv\[2\]\.tokens: `postfix` again, as treft\.kv\[0\].*Merge the two"),
    ("kv_list_duplicate_tokens_overlapping_layers",
     {"kv": [{"weight": 5.0, "layers": [0, 1]}, {"weight": 1.0, "layers": [1, 2]}]}, r"treft\.kv\[1\]\.tokens"),
    ("kv_list_with_inoculation", {"kv": [{"weight": 5.0, "tokens": "postfix"}, {"weight": 5.0, "tokens": "prefix"}],
                                  "inoculation": INOCULATION},
     r"treft\.inoculation: cannot be combined with treft\.kv\[1\]\.tokens: prefix"),
]


@pytest.mark.parametrize(("treft", "message"), [c[1:] for c in SILENT_CONFIGS], ids=[c[0] for c in SILENT_CONFIGS])
def test_silent_config_is_refused_naming_the_key(smollm2_dir, tmp_path, treft, message):
    with pytest.raises(ValueError, match=message):
        validate(make_cfg(smollm2_dir, tmp_path, treft))


def test_distinct_kv_terms_and_default_feature_count_still_validate(smollm2_dir, tmp_path):
    terms = {"kv": [{"weight": 5.0, "tokens": "postfix", "reference": "fixed"}, {"weight": 1.0, "tokens": "postfix"},
                    {"weight": 5.0, "layers": [0, 1]}, {"weight": 1.0, "layers": [2, 3]},
                    {"weight": 2.0, "tokens": "query", "active_steps": [0, 5]},
                    {"weight": 2.0, "tokens": "query", "active_steps": [5, 10]}],
             "inoculation": INOCULATION}
    with pytest.raises(ValueError, match="inoculation"):  # the prefix terms
        validate(make_cfg(smollm2_dir, tmp_path, terms))
    del terms["inoculation"]
    assert len(validate(make_cfg(smollm2_dir, tmp_path, terms)).treft.kv) == 6
    with_inoculation = {"kv": [{"weight": 5.0, "tokens": "postfix"}, {"weight": 1.0, "tokens": "query"}],
                        "inoculation": INOCULATION}
    assert validate(make_cfg(smollm2_dir, tmp_path, with_inoculation)).treft.inoculation
    assert validate(make_cfg(smollm2_dir, tmp_path, {"feature_l2": {"weight": 1.0}})).treft.feature_l2.layers == 5


def test_feature_layers_at_setup_when_validation_could_not_see_the_model():
    """A hub model not in the local cache: the count and aliases are checked against the loaded model."""
    with pytest.raises(ValueError, match=r"treft\.feature_l2\.layers: 8 layers asked, but the model has 2"):
        layer_indices(8, 2, given=True)
    assert layer_indices(5, 2) == [0, 1]  # the default count, capped
    with pytest.raises(ValueError, match=r"layer -2 \(= 0 in a model with 2 layers\) is listed twice"):
        layer_indices([0, -2], 2)


# ------------------------------------------------------------------------------------------- report --plot
def run_report(*argv: str) -> int:
    """``axolotl-treft report`` with these arguments (its own parser options)."""
    import argparse

    from axolotl_treft.cli.evaluation import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    return report.main(parser.parse_args(["report", *argv]))


def _result_file(tmp_path):
    from tests.test_report import _results

    f = tmp_path / "r.json"
    f.write_text(json.dumps(_results()))
    return f


@pytest.mark.parametrize("form", ["existing_dir", "trailing_slash", "no_suffix"])
def test_report_plot_prints_the_file_it_writes(tmp_path, capsys, form):
    f = _result_file(tmp_path)
    target = {"existing_dir": tmp_path / "plots", "trailing_slash": tmp_path / "new", "no_suffix": tmp_path / "cmp"}
    arg = str(target[form]) + ("/" if form == "trailing_slash" else "")
    if form == "existing_dir":
        target[form].mkdir()
    assert run_report(*[str(f), "--plot", arg]) == 0
    printed = capsys.readouterr().out.split("plot: ")[1].split("\n")[0]
    want = {"existing_dir": target[form] / "treft_report.png", "trailing_slash": target[form] / "treft_report.png",
            "no_suffix": tmp_path / "cmp.png"}[form]
    assert printed == str(want) and want.read_bytes()[:4] == b"\x89PNG"
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p != f)
    assert written == [want]


def test_report_plot_with_an_unknown_image_type_is_refused_before_anything(tmp_path, capsys):
    f = _result_file(tmp_path)
    assert run_report(*[str(f), "--plot", str(tmp_path / "cmp.txt")]) == 2
    captured = capsys.readouterr()
    assert "unknown image type '.txt'" in captured.err and "plot:" not in captured.out
    assert not (tmp_path / "cmp.txt").exists()

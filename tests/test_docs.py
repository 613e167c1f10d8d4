"""The documentation: generated tables (``docs/hooks.py``) and README's results table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def test_readme_results_table_is_generated_from_the_json():
    readme = (REPO / "README.md").read_text()
    assert hooks.readme_table() in readme, "README's results table is stale: run `python docs/hooks.py --readme`"


def test_every_table_renders_from_the_committed_results():
    results = hooks.Results()
    for name in hooks.TABLES:
        text = hooks.render_table(name, results)
        if (
            (name.startswith("peers") and not results.has("peers.json"))
            or (name == "lead_time" and not results.has("lead_time.json"))
            or (name.startswith("fault_zoo") and not results.has("fault_zoo.json"))
        ):
            assert hooks.NOT_MEASURED in text
            continue
        assert text.startswith("| "), f"table {name!r}: {text[:200]}"
        assert "lack a field" not in text, f"table {name!r}: {text[:300]}"


def test_tables_without_results_say_not_measured_and_invent_nothing(tmp_path):
    results = hooks.Results(tmp_path)  # an empty results folder
    for name in hooks.TABLES:
        text = hooks.render_table(name, results)
        assert hooks.NOT_MEASURED in text, name
    summary = hooks.render_table("benchmark_summary", results)
    for row in summary.splitlines()[2:]:
        result_cell = row.split(" | ")[2]
        assert not any(ch.isdigit() for ch in result_cell.replace("10 %", "")), row
    page = hooks.expand('x {{ result("rescue.json", "summary.kit_finished_finite") }} y', results)
    assert page.startswith("x *not measured yet*")
    assert page.endswith(" y")


def test_tables_with_missing_keys_say_not_measured(tmp_path):
    for name in hooks.BENCHMARKS + ("reliability.json",):
        (tmp_path / name).write_text(json.dumps({"command": "python x.py", "cases": [{}], "rows": [{}]}))
    results = hooks.Results(tmp_path)
    for name in hooks.TABLES:
        text = hooks.render_table(name, results)
        if name == "runs":  # which files exist and what they recorded: nothing is measured there
            assert "not recorded" in text
            assert "GPU" not in text
        else:
            assert hooks.NOT_MEASURED in text, name


def test_optional_codec_metrics_appear_once_measured(tmp_path):
    data = json.loads((hooks.RESULTS / "codec_quality.json").read_text())
    assert "PESQ" in hooks.render_table("codec_quality", hooks.Results()) or "pesq" in data["cases"][0]["eval"]
    for case in data["cases"]:  # only the first case measured PESQ: the column appears, the others say so
        case["eval"].pop("pesq", None)
    data["cases"][0]["eval"]["pesq"] = 2.345
    (tmp_path / "codec_quality.json").write_text(json.dumps(data))
    text = hooks.render_table("codec_quality", hooks.Results(tmp_path))
    header, _, first, second, *_ = text.splitlines()
    assert "PESQ" in header
    assert "2.35" in first
    assert hooks.NOT_MEASURED in second


def test_result_values_and_formats():
    results = hooks.Results()
    value = json.loads((hooks.RESULTS / "lr_sensitivity.json").read_text())["summary"]["ratio"]
    assert hooks.expand('{{ result("lr_sensitivity.json", "summary.ratio", ".3f") }}', results) == f"{value:.3f}"
    assert hooks.fmt(0.0878, "%") == "+8.8 %"
    assert hooks.fmt(206.68, "%") == "+20 668 %"
    assert hooks.fmt(float("nan")) == "NaN"
    assert hooks.fmt(True) == "yes"


def test_the_syntax_shown_as_inline_code_is_left_alone():
    macro = '{{ result("rescue.json", "summary.target_met") }}'
    value = hooks.expand(macro)
    assert value in ("yes", "**no**")  # whatever the committed measurement says
    assert hooks.expand(f"write `{macro}` to get {macro}") == f"write `{macro}` to get {value}"


def test_unknown_table_names_the_known_ones():
    with pytest.raises(KeyError, match="benchmark_summary"):
        hooks.render_table("no_such_table", hooks.Results())


def test_api_blocks_cover_every_public_name():
    from lightning_stability import callbacks

    blocks = hooks.api_blocks("lightning_stability.callbacks")
    assert blocks.count(":::") == len(callbacks.__all__)
    assert "::: lightning_stability.callbacks.GradientGuard" in blocks

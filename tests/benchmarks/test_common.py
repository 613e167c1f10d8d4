import importlib
import json
import math
from argparse import Namespace

import torch

from tests.benchmarks import _bench_path  # noqa: F401  (sys.path)

_common = importlib.import_module("_common")


def test_json_safe_turns_non_finite_floats_and_tensors_into_strict_json():
    doc = _common.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": torch.tensor([0.5, -math.inf])})
    assert doc == {"a": "nan", "b": [1.0, "inf"], "c": [0.5, "-inf"]}
    json.dumps(doc, allow_nan=False)


def test_write_result_has_the_documented_layout(tmp_path):
    out = tmp_path / "r.json"
    args = Namespace(out=out, quick=True)
    path = _common.write_result(
        "demo",
        args,
        config={"x": 1},
        cases=[{"loss": float("nan")}],
        summary={"target": "t", "target_met": False},
        started=0.0,
        machine={"cpu_cores": 2},
    )
    doc = json.loads(path.read_text())
    assert path == out
    assert list(doc) == [
        "benchmark",
        "schema_version",
        "mode",
        "command",
        "created_utc",
        "wall_time_s",
        "machine",
        "config",
        "cases",
        "summary",
    ]
    assert (doc["benchmark"], doc["mode"], doc["cases"], doc["summary"]["target_met"]) == (
        "demo",
        "quick",
        [{"loss": "nan"}],
        False,
    )
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no temporary left behind

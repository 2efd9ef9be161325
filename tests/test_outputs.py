"""What a run writes is standard JSON: no NaN, whatever the loss was."""

import json

from shardwise.train.outputs import MetricsLog, write_json


def test_non_finite_numbers_are_written_as_null(tmp_path):
    write_json(tmp_path / "summary.json", {"loss": float("nan"), "rows": [1.0, float("inf")], "ok": 0.5})
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 3, "loss": float("-inf")})
    log.close()
    strict = {"parse_constant": lambda name: (_ for _ in ()).throw(ValueError(name))}  # NaN, Infinity refused
    assert json.loads((tmp_path / "summary.json").read_text(), **strict) == {
        "loss": None,
        "rows": [1.0, None],
        "ok": 0.5,
    }
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), **strict) == {"step": 3, "loss": None}

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
    line = json.loads((tmp_path / "metrics.jsonl").read_text(), **strict)
    assert {k: v for k, v in line.items() if not k.startswith("time")} == {"step": 3, "loss": None}


def test_outputs_are_written_with_the_permissions_open_gives(tmp_path):
    """Atomic writes go through a temporary file (mkstemp makes it 0600); the file that
    lands has the mode any other file gets under the umask."""
    import os

    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "summary.json", {"ok": 1})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(mask)
    modes = {(tmp_path / name).stat().st_mode & 0o777 for name in ("summary.json", "plain.txt")}
    assert modes == {0o644}


def test_the_summary_table_names_what_a_layout_shards():
    from rich.console import Console

    from shardwise.train.progress import render_summary

    summary = {"val_accuracy": 0.5, "val_loss": 1.0, "train_loss": 1.0, "steps": 2, "global_batch": 8}
    summary |= {"layout": "dp=4", "world_size": 4, "backend": "gloo", "model": "mlp", "parameters": 10}
    summary |= {"samples_per_s": 1.0, "step_time_s": 0.1, "wall_s": 1.0}
    for shard, shown in (("full", "dp=4, shard=full on 4 process(es)"), ("none", "dp=4 on 4 process(es)")):
        console = Console(record=True, width=200)
        console.print(render_summary({**summary, "shard": shard}, "out"))
        assert shown in console.export_text()


def test_the_curves_of_a_resumed_run_show_its_whole_history(tmp_path, monkeypatch):
    """metrics.jsonl keeps the steps before a resume; the curves are drawn from it."""
    from shardwise.config import load_config
    from shardwise.topology import ParallelDims
    from shardwise.train import outputs

    drawn = []
    monkeypatch.setattr(outputs, "plot_curves", lambda path, records, title: drawn.extend(records))
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": null}}\n' for s in (2, 4, 6, 8)))
    cfg = load_config(None, {})
    dims = ParallelDims.resolve(cfg.parallel, 1)
    outputs.write_run(tmp_path, cfg, dims, {}, [{"step": 6, "loss": 1.0}, {"step": 8, "loss": 1.0}], {"ok": 1}, {})
    assert [r["step"] for r in drawn] == [2, 4, 6, 8] and all(r["loss"] != r["loss"] for r in drawn)  # NaN

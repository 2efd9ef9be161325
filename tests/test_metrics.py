"""What a run records as it goes: timestamps in metrics.jsonl, TensorBoard event files
read back by TensorBoard's own reader, the gradient norm, and the communication share."""

from __future__ import annotations

import datetime
import json
import math
from types import SimpleNamespace

import pytest

import shardwise
from shardwise.train.comm_share import time_shares

SETTINGS = {
    "model.name": "mlp",
    "model.hidden": [64],
    "train.steps": 20,
    "train.log_every": 5,
    "train.eval_every": 10,
    "run.progress": False,
}


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def board_run(tmp_path_factory):
    settings = {**SETTINGS, "run.tensorboard": True, "run.comm_share": True, "run.profile": True}
    return shardwise.run(shardwise.build_config(settings), nproc=2, out=tmp_path_factory.mktemp("m") / "run")


def test_tensorboard_holds_what_metrics_jsonl_holds(board_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(board_run.out / "tensorboard"))
    board.Reload()
    records = _records(board_run)
    expected = {
        "train/loss": "loss",
        "train/learning_rate": "lr",
        "train/grad_norm": "grad_norm",
        "validation/accuracy": "val_accuracy",
        "speed/samples_per_s": "samples_per_s",
        "speed/comm_share": "comm_share",
    }
    assert set(expected) <= set(board.Tags()["scalars"])
    for tag, key in expected.items():
        logged = [(r["step"], r[key]) for r in records if key in r]
        events = [(e.step, e.value) for e in board.Scalars(tag)]
        assert [s for s, _ in events] == [s for s, _ in logged], tag
        assert all(math.isclose(v, w, rel_tol=1e-6) for (_, v), (_, w) in zip(events, logged, strict=True)), tag
    assert [e.step for e in board.Scalars("validation/accuracy")] == [10, 20]
    assert all(0 < r["comm_share"] < 1 for r in records)  # 2 data-parallel ranks: some waiting is exposed


def test_every_rank_says_where_its_steps_went(board_run):
    """run.profile: each rank's logged steps split into compute, copies, exposed
    communication and the rest, and the last one's trace, which Chrome's format reads."""
    for rank in (0, 1):
        found = json.loads((board_run.out / "profile" / f"rank-{rank}.json").read_text())
        assert found["rank"] == rank and [s["step"] for s in found["steps"]] == [5, 10, 15, 20]
        for s in found["steps"]:
            assert sum(s[k] for k in ("compute", "copies", "communication", "other")) == pytest.approx(1.0)
            assert s["compute"] > 0 and s["communication"] > 0  # an MLP's step on 2 data-parallel ranks
        middle = sorted(s["compute"] for s in found["steps"])[1:3]
        assert found["median"]["compute"] == pytest.approx(sum(middle) / 2)
        trace = json.loads((board_run.out / "profile" / f"rank-{rank}.trace.json").read_text())
        assert any(e.get("name", "").startswith("gloo:") for e in trace["traceEvents"])
    assert _records(board_run)[0]["comm_share"] == pytest.approx(
        json.loads((board_run.out / "profile" / "rank-0.json").read_text())["steps"][0]["communication"]
    )


def test_every_line_is_stamped_in_order(board_run):
    records = _records(board_run)
    stamps = [datetime.datetime.fromisoformat(r["time"]) for r in records]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all(s.tzinfo is not None for s in stamps) and stamps == sorted(stamps)
    assert all(abs(s.timestamp() - r["time_unix"]) < 0.002 for s, r in zip(stamps, records, strict=True))
    assert stamps[-1].timestamp() - stamps[0].timestamp() < board_run.summary["wall_s"]


def test_the_gradient_norm_is_the_whole_models(tmp_path):
    """A tensor-parallel run (each rank holds half of every paired layer) logs the norm of
    the whole model's gradient: the plain PyTorch loop's torch.nn.utils.get_total_norm at
    the same steps."""
    from parity import BASE, plain_train, with_data

    overrides = with_data({"model.name": "mlp", "model.hidden": "64,32", "train.log_every": "3"})
    norms: list[float] = []
    plain_train(overrides, norms_out=norms)
    cfg = shardwise.build_config({**BASE, **overrides, "parallel.tp": "2"})
    logged = _records(shardwise.run(cfg, nproc=2, out=tmp_path / "tp"))
    assert [r["step"] for r in logged] == [3, 6, 9, 12]
    for r in logged:
        assert r["grad_norm"] == pytest.approx(norms[r["step"] - 1], rel=1e-4), r["step"]


def test_exposed_communication_counts_only_what_no_computation_overlaps():
    def event(name, start, end):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))

    events = [
        event("aten::mm", 0, 40),
        event("gloo:all_reduce", 30, 70),  # 30..40 overlaps the mm: 30 exposed
        event("gloo:all_reduce", 60, 80),  # merges with the one before: 70..80 more
        event("aten::add_", 75, 90),  # hides 75..80
        event("DistributedDataParallel.forward", 0, 100),  # neither compute nor communication
        event("nccl:send", 95, 100),
    ]
    assert time_shares(events, 100.0)["communication"] == pytest.approx((70 - 40 + 75 - 70 + 5) / 100)
    assert time_shares([event("aten::mm", 0, 10)], 10.0)["communication"] == 0.0
    # the whole step: compute less its copies, the copies, the exposed communication, the rest
    events.append(event("aten::copy_", 10, 20))  # inside the mm's span: a copy, not compute
    events.append(event("aten::cat", 40, 45))  # the copy hides 40..45 of the all-reduce
    shares = time_shares(events, 100.0)
    assert shares["compute"] == pytest.approx((40 - 10 + 15) / 100)  # 0..40 and 75..90, less 10..20
    assert shares["copies"] == pytest.approx(15 / 100)
    assert shares["communication"] == pytest.approx((70 - 45 + 75 - 70 + 5) / 100)
    assert shares["other"] == pytest.approx((95 - 90) / 100)  # 90..95: neither


def test_one_process_spends_nothing_on_communication(tmp_path):
    settings = {**SETTINGS, "run.comm_share": True}
    one = shardwise.run(shardwise.build_config(settings), nproc=1, out=tmp_path / "one")
    assert all(r["comm_share"] == 0.0 for r in _records(one))

import pytest

from shardwise.train.optim import lr_factor


def test_warmup_then_constant():
    f = [lr_factor(s, total_steps=10, schedule="constant", warmup_steps=4) for s in range(10)]
    assert f == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_cosine_decays_to_zero_at_the_end():
    f = [lr_factor(s, total_steps=12, schedule="cosine", warmup_steps=2) for s in range(13)]
    assert f[2] == 1.0 and f[7] == pytest.approx(0.5) and f[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))


def test_step_schedule():
    f = [lr_factor(s, total_steps=100, schedule="step", warmup_steps=0, step_every=3, step_gamma=0.5) for s in range(7)]
    assert f == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]

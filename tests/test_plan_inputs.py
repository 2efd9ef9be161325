"""The planner's measured inputs: the per-layer line fit, what a profile counts exactly
(bytes), and the cache that keeps a model from being profiled twice."""

from __future__ import annotations

import pytest
import torch

from shardwise.config import ModelConfig
from shardwise.models import build_model
from shardwise.plan.profile import ModelProfile, cached, fit_line, profile_key, profile_model


def test_the_fit_is_least_squares_and_never_negative():
    fixed, per_sample = fit_line([8, 32, 64], [0.001 + 8e-5, 0.001 + 32e-5, 0.001 + 64e-5])
    assert fixed == pytest.approx(0.001) and per_sample == pytest.approx(1e-5)
    assert fit_line([8, 32, 64], [3.0, 2.0, 1.0]) == (2.0, 0.0)  # noise tilting it down: flat at the mean
    assert fit_line([8, 32], [-1.0, -1.0]) == (0.0, 0.0)


def _mlp() -> tuple[torch.nn.Module, dict]:
    cfg = ModelConfig(name="mlp", hidden=[48, 24])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 8, 8), 10)
    return model, profile_key({"name": "mlp", "hidden": [48, 24]}, (1, 8, 8), torch.float32, torch.device("cpu"))


def test_a_profile_counts_bytes_exactly():
    model, key = _mlp()
    profile = profile_model(model, torch.randn(1, 8, 8), key, repeats=1)
    linears = [layer for layer in profile.layers if layer.kind == "linear"]
    assert [layer.param_bytes for layer in linears] == [4 * (64 * 48 + 48), 4 * (48 * 24 + 24), 4 * (24 * 10 + 10)]
    assert [layer.out_bytes_per_sample for layer in linears] == [4 * 48, 4 * 24, 4 * 10]
    assert profile.param_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert all(layer.fixed_s >= 0 and layer.per_sample_s >= 0 for layer in profile.layers)
    assert ModelProfile.from_json(profile.to_json()) == profile


def test_a_model_is_profiled_once_per_key(tmp_path):
    model, key = _mlp()
    calls = []

    def measure():
        calls.append(1)
        return profile_model(model, torch.randn(1, 8, 8), key, repeats=1)

    first = cached(tmp_path, key, measure)
    assert cached(tmp_path, key, measure) == first and len(calls) == 1
    cached(tmp_path, {**key, "threads": key["threads"] + 1}, measure)
    assert len(calls) == 2 and len(list(tmp_path.glob("profile-*.json"))) == 2

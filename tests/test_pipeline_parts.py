"""Pipeline pieces that need no processes: the cut, the units, stage names, the bubble."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from shardwise.config import ModelConfig
from shardwise.errors import ShardwiseError
from shardwise.models import build_model
from shardwise.parallel.pipeline import StageModule, choose_cut, layer_units, model_layers, stage_layers
from shardwise.train.timeline import bubble_fractions


def _slowest(costs, cut):
    bounds = [*cut, len(costs)]
    return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize("seed", range(20))
def test_cut_is_the_best_balance(seed):
    rng = np.random.default_rng(seed)
    costs = rng.exponential(size=int(rng.integers(3, 9))).tolist()
    stages = int(rng.integers(1, len(costs) + 1))
    cut = choose_cut(costs, stages)
    assert cut[0] == 0 and len(cut) == stages and all(a < b for a, b in itertools.pairwise(cut))
    every = [[0, *c] for c in itertools.combinations(range(1, len(costs)), stages - 1)]
    assert _slowest(costs, cut) == pytest.approx(min(_slowest(costs, c) for c in every))


def test_cut_refuses_more_stages_than_layers():
    with pytest.raises(ShardwiseError, match="parallel.pp: 4 stages, but the model has only 3 layers"):
        choose_cut([1.0, 2.0, 3.0], 4)


def test_units_carry_weights_and_stages_keep_the_model_names():
    model = build_model(ModelConfig(name="mlp", hidden=[16, 8]), (1, 8, 8), 10)
    assert [n for n, _ in model_layers(model)][:3] == ["features.0", "head.0", "head.1"]
    assert layer_units(model) == [[0, 1, 2], [3, 4], [5]]  # flatten+linear+relu, linear+relu, linear
    stage = StageModule(stage_layers(model, [0, 3], 1))
    whole = model.state_dict()
    assert set(stage.state_dict()) == {"head.2.weight", "head.2.bias", "head.4.weight", "head.4.bias"}
    for name, t in stage.state_dict().items():
        assert torch.equal(t, whole[name])
    first = StageModule(stage_layers(model, [0, 3], 0))
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(stage(first(x)), model(x))


def test_bubble_of_an_ideal_gpipe_timeline():
    """Unit-time forwards and double-time backwards on a perfect GPipe schedule
    idle exactly (P - 1) / (M + P - 1) of the time."""
    stages, micro = 3, 4
    events = [[] for _ in range(stages)]
    for s in range(stages):
        for m in range(micro):
            events[s].append((0, 0, m, s + m, s + m + 1))
            start = (micro + stages - 1) + 2 * (stages - 1 - s) + 2 * m
            events[s].append((0, 1, m, start, start + 2))
    measured = bubble_fractions([torch.tensor(e, dtype=torch.float64) for e in events])
    assert measured == [pytest.approx((stages - 1) / (micro + stages - 1))]  # GPipe's (P - 1) / (M + P - 1)


def test_a_deterministic_cut_balances_multiply_adds_not_the_clock():
    """Under train.deterministic the cut must not depend on timing: each layer weighs its
    weights' bytes times their uses (one per sample for a linear layer, one per output
    pixel for a convolution), and an activation its output bytes."""
    from torch import nn

    from shardwise.parallel.pipeline import LayerCost, multiply_adds, profile_layers

    model = nn.Sequential()
    model.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    model.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    costs = profile_layers(model, torch.randn(5, 1, 8, 8), repeats=1)
    conv, relu, flat, linear = costs
    assert multiply_adds(conv) == (4 * 9 + 4) * 4 * (5 * 8 * 8)  # weights + bias, float32, 5 x 8 x 8 pixels
    assert multiply_adds(linear) == (256 * 10 + 10) * 4 * 5
    assert multiply_adds(relu) == 5 * 4 * 8 * 8 * 4 and multiply_adds(flat) == 5 * 256 * 4
    slow = LayerCost("x", 1e9, linear.param_bytes, linear.activation_bytes, linear.out_shape)
    assert multiply_adds(slow) == multiply_adds(linear)  # the clock does not enter

"""Activation checkpointing (train.activation_checkpointing): the backward runs each unit's
forward again instead of keeping its activations. The same gradients as without, bit for
bit, on one process; fewer bytes kept by the forward; running statistics moved once; and
every layout it composes with still ends with the plain loop's weights (parity.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from parity import BASE, reference, with_data
from refusals import refused_in_one_line
from torch import nn

from shardwise.config import load_config
from shardwise.errors import ShardwiseError
from shardwise.job import run
from shardwise.models.convnet import ConvNet
from shardwise.models.mlp import MLP
from shardwise.models.resnet import ResNet
from shardwise.parallel.part import Part
from shardwise.parallel.pipeline import StageCut, StageModule, layer_units, model_layers
from shardwise.parallel.recompute import apply_checkpointing, checkpoint_layers, stack_units
from shardwise.plan.checkpointing import explain
from shardwise.plan.model import Prediction, checkpointed
from shardwise.plan.profile import LayerProfile, ModelProfile, profile_model


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The bytes autograd keeps from the forward for the backward, and the output."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return total[0], out


# the units checkpointed, counted by hand: the MLP's two Linear + ReLU (not the classifier
# alone); the convnet's two conv + norm + ReLU (+ pool, flatten) and one Linear + ReLU; the
# ResNet's stem conv + norm + ReLU and its two residual blocks (the second with the pooling)
MODELS = [
    ("mlp", lambda: MLP((1, 8, 8), 10, hidden=[64, 64]), (1, 8, 8), 2),
    ("convnet", lambda: ConvNet((1, 16, 16), 10, channels=[8, 16], hidden=[32], norm="group"), (1, 16, 16), 3),
    ("resnet", lambda: ResNet((3, 16, 16), 10, widths=[8, 16], norm="group"), (3, 16, 16), 3),
]


@pytest.mark.parametrize("name, build, shape, units", MODELS, ids=[m[0] for m in MODELS])
def test_same_gradients_and_fewer_bytes_kept(name, build, shape, units):
    torch.manual_seed(0)
    plain = build()
    checked = copy.deepcopy(plain)
    assert checkpoint_layers(checked) == units
    assert list(checked.state_dict()) == list(plain.state_dict())  # names unchanged
    x = torch.randn(4, *shape)
    kept_plain, out_plain = _saved_bytes(plain, x)
    kept_checked, out_checked = _saved_bytes(checked, x)
    assert torch.equal(out_plain, out_checked)
    assert kept_checked < 0.6 * kept_plain, (kept_checked, kept_plain)
    out_plain.square().sum().backward()
    out_checked.square().sum().backward()
    for (n, p), q in zip(plain.named_parameters(), checked.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n


def test_the_backward_runs_each_forward_again_and_evaluation_once():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=[16, 16])
    checkpoint_layers(model)
    calls = []
    for layer in model.head:
        layer.register_forward_hook(lambda m, a, o: calls.append(m))  # noqa: B023
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    # the forward, then the backward's recompute of each Linear + ReLU unit's Linear (torch
    # stops a recompute once it has what the backward needs: the ReLU's output is the unit's)
    assert calls[: len(model.head)] == list(model.head)
    assert sorted(calls[len(model.head) :], key=id) == sorted([model.head[0], model.head[2]], key=id)
    calls.clear()
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    assert calls == list(model.head)


def test_running_statistics_move_once():
    """A batch norm's running mean and variance: as without checkpointing after a step,
    though its forward ran twice."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

        def forward(self, x):
            return self.head(self.features(x))

    plain = Net()
    checked = copy.deepcopy(plain)
    checkpoint_layers(checked)
    x = torch.randn(5, 1, 8, 8)
    for model in (plain, checked):
        model(x).sum().backward()
    for (name, a), b in zip(plain.named_buffers(), checked.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_a_model_without_the_stacks_is_one_line():
    with pytest.raises(ShardwiseError) as e:
        checkpoint_layers(nn.Linear(3, 2))
    assert e.value.field == "train.activation_checkpointing" and "Linear" in str(e.value)


def test_the_cost_model_reruns_the_units_the_engine_checkpoints():
    """Units cut by hand: a leading flatten joins the first; a block of layers alone is
    checkpointed, a plain layer alone (the classifier) is not."""

    def layer(name, kind, params):
        return LayerProfile(name, kind, 0.0, 0.0, params, 4)

    layers = [
        layer("features.0", "other", 0),  # a flatten: no weights
        layer("features.1", "block", 8),  # a block of layers with weights, alone
        layer("features.2", "conv", 8),  # a convolution, its norm and activation
        layer("features.3", "norm", 8),
        layer("features.4", "other", 0),
        layer("head.0", "linear", 8),  # a linear layer and its activation
        layer("head.1", "other", 0),
        layer("head.2", "linear", 8),  # the classifier alone
    ]
    assert checkpointed(ModelProfile({}, tuple(layers))) == [True, True, True, True, True, True, True, False]


@pytest.mark.parametrize("name, build, shape, units", MODELS, ids=[m[0] for m in MODELS])
def test_the_cost_model_prices_what_the_engine_checkpoints(name, build, shape, units):
    """The layers the cost model prices as run again are those the engine checkpoints, for
    the whole model and for every pipeline cut between two layers with weights (each
    stage's stacks cut into units of their own)."""
    model = build()
    profile = profile_model(model, torch.randn(shape), {}, repeats=1, sizes=(1, 2))
    layers = model_layers(model)
    cuts = [[0, len(layers)]] + [[0, unit[0], len(layers)] for unit in layer_units(model)[1:]]
    for cut in cuts:
        engine = []
        for a, b in zip(cut, cut[1:], strict=False):
            stage = StageModule(layers[a:b])
            engine += [on for stack in (stage.features, stage.head) for unit, on in stack_units(stack) for _ in unit]
        assert checkpointed(profile, cut) == engine, cut
    assert sum(on for _, on in stack_units(model.features) + stack_units(model.head)) == units


def test_a_rank_of_several_pipeline_stages_checkpoints_each_stage():
    """Under the interleaved schedules a rank runs its stages apart (each a module over its
    part's layers), so each stage's stacks are checkpointed, not the part's; the units
    counted are the stages' own, and a stage's forward gives what it gave before."""
    model = MLP((64,), 10, hidden=[32, 32, 32])
    layers = model_layers(model)  # a Flatten, three Linear + ReLU, then the classifier
    chunks = [(0, StageModule(layers[0:5]), ((2, 64), (2, 32))), (2, StageModule(layers[5:8]), ((2, 32), (2, 32)))]
    part = Part(StageModule(layers[0:8]))
    stage = StageCut(index=0, stages=2, group=None, owner={}, rows=[], chunks=chunks, ranks=[0, 1, 0, 1])
    x, h = torch.randn(2, 64), torch.randn(2, 32)
    before = [chunks[0][1](x), chunks[1][1](h)]
    done = apply_checkpointing(part.but(stage=stage), "layers")
    units = [on for _, c, _ in chunks for stack in (c.features, c.head) for _, on in stack_units(stack)]
    assert done.checkpointed == sum(units) == 3  # two Linear + ReLU units in the first stage, one in the third
    for (_, chunk, _), (inp, out) in zip(chunks, [(x, before[0]), (h, before[1])], strict=True):
        assert "forward" in vars(chunk.head)  # its own stack runs checkpointed
        torch.testing.assert_close(chunk(inp), out)
    assert "forward" not in vars(part.model.head)


def _weights_and_units(overrides: dict[str, str], *, group) -> tuple[dict, int]:
    result = run(load_config(None, {**BASE, **overrides}), group=group)
    return result.state_dict, result.summary.get("checkpointed_units", 0)


LAYOUTS = {
    "dp": ({"model.name": "convnet", "model.channels": "8,16"}, 2),
    "fsdp": ({"model.name": "mlp", "parallel.shard": "full"}, 2),
    "tp": ({"model.name": "mlp", "parallel.tp": "2"}, 2),
    "pp-gpipe": (
        {"model.name": "convnet", "model.channels": "8,16", "parallel.pp": "2", "parallel.microbatches": "4"},
        2,
    ),
    "spatial": ({"model.name": "convnet", "model.channels": "8,16", "parallel.spatial": "2"}, 2),
    # two stages a rank: each stage's own stacks checkpointed, the units counted over them
    "pp-interleaved": (
        {"model.name": "convnet", "model.channels": "8,16", "parallel.pp": "2", "parallel.schedule": "interleaved"},
        2,
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpointed_layouts_train_like_one_process(pool, layout):
    overrides, nproc = LAYOUTS[layout]
    overrides = with_data({**overrides, "train.activation_checkpointing": "layers"})
    results = pool.run(_weights_and_units, overrides, ranks=list(range(nproc)))
    expected = reference(overrides)
    # every rank checkpoints its part (a pipeline stage cut by the clock may hold a layer alone)
    counts = [units for _, units in results]
    assert all(counts) or (layout.startswith("pp") and counts[-1] > 0), counts
    for rank, (state, _) in enumerate(results):
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.memory_per_rank": "lots"}, "train.memory_per_rank: 'lots': expected a size such as 512MiB or 2GiB"),
        ({"train.memory_per_rank": "0MiB"}, "train.memory_per_rank: must be positive, got '0MiB'"),
        (
            {"train.activation_checkpointing": "some"},
            "train.activation_checkpointing: expected one of none, layers, auto, got 'some'",
        ),
    ],
    ids=["budget", "no budget", "mode"],
)
def test_bad_settings_are_one_line(tmp_path, capfd, overrides, message):
    refused_in_one_line(tmp_path, capfd, overrides, message)


def test_auto_under_torchrun_is_one_line():
    """auto is the launcher's to resolve; a rank torchrun started says to name a mode."""
    from shardwise.worker import run_rank

    cfg = load_config(None, {"train.activation_checkpointing": "auto"})
    with pytest.raises(ShardwiseError, match="auto is chosen by shardwise's own launcher; under torchrun, name none"):
        run_rank(cfg)


def test_auto_says_when_checkpointing_would_not_help():
    """The line auto prints: a layout over the budget whose checkpointed peak is no smaller
    is not said to fit."""
    over = Prediction("dp=2", 0.01, 0.0, 0.0, 600 * 2**20)
    said = explain(False, over, over, 512 * 2**20, "train.memory_per_rank")
    assert said == (
        "none (the predicted peak, 600.0 MiB a rank, does not fit 512.0 MiB (train.memory_per_rank) with 10% to "
        "spare, "
        "and checkpointing would not lower it)"
    )
    assert explain(False, over, over, 1024 * 2**20, "train.memory_per_rank").startswith(
        "none (the predicted peak, 600.0"
    )

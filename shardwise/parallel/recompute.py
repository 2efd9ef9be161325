"""Activation checkpointing (`train.activation_checkpointing`): trade a second forward for
the activations a backward would otherwise keep.

`layers`: every unit of the model's layers (a layer with weights, and the normalisation
and parameter-free layers after it: a convolution with its norm, activation and pooling;
a linear layer with its activation; a residual block) runs under `torch.utils.checkpoint`
(non-reentrant). The forward keeps only each unit's input; when the backward reaches a
unit it runs the unit's forward again, as far as it needs, for the rest. A unit of one
layer (a last classifier) or without weights (a leading flatten) runs as it is: it would
keep the same either way.

Applied per stack (`features`, `head`), after the layer partitioning and before the
data-parallel wrapper (layout.py): on the layers as the partitioning left them, so a
tensor-parallel pair's all-reduce, a band's halo exchange and a group norm's sums run
again in the recompute, in the same order on every rank of their group; FSDP2's units sit
inside a checkpointed unit, and its backward's gather of their parameters serves the
recompute too. The stacks' own
`forward` is replaced, no module is wrapped, so parameter names, state dicts,
checkpoints and splits see the same model. A norm's running statistics are put back
after a recompute, so they move once a step, as without checkpointing.

`auto` is resolved by the launcher before the ranks start (plan/checkpointing.py):
checkpointing only where the layout's predicted peak does not fit the memory a rank has.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from shardwise.errors import ShardwiseError
from shardwise.parallel.part import Part
from shardwise.parallel.pipeline import STACKS, units_of

MODES = ("none", "layers", "auto")


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (torch's, or a partitioned one): it joins the unit before it."""
    return "Norm" in type(module).__name__


def checkpointed_units(starts: list[bool], composite: list[bool]) -> list[tuple[list[int], bool]]:
    """The units of a stack whose layers `starts` a unit (weights, not a normalisation), each
    with whether it is checkpointed: it has weights, and more than one layer or a
    `composite` one (a residual block); a single plain layer keeps its input either way,
    and the recompute would find it kept and run nothing."""
    units = units_of(starts) if starts else []
    return [(u, any(starts[i] for i in u) and (len(u) > 1 or composite[u[0]])) for u in units]


def stack_units(stack: nn.Sequential) -> list[tuple[list[nn.Module], bool]]:
    """The stack's layers in units, each with whether it is checkpointed."""
    layers = list(stack.children())
    starts = [_has_params(m) and not is_norm(m) for m in layers]
    found = checkpointed_units(starts, [any(True for _ in m.children()) for m in layers])
    return [([layers[i] for i in unit], on) for unit, on in found]


def _unit_runner(unit: list[nn.Module], buffers: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """Runs the unit's layers; every call after the first (the backward's recompute) puts
    the layers' `buffers` (a norm's running statistics) back as they were before it."""
    calls = [0]

    def run(x: Tensor) -> Tensor:
        calls[0] += 1
        kept = [b.clone() for b in buffers] if calls[0] > 1 else None
        try:
            for layer in unit:
                x = layer(x)
        finally:  # torch ends a recompute early, by an exception, once it has what it needs
            if kept is not None:
                with torch.no_grad():
                    for b, old in zip(buffers, kept, strict=True):
                        b.copy_(old)
        return x

    return run


def _checkpointed_forward(units: list[tuple[list[nn.Module], bool]]) -> Callable[[Tensor], Tensor]:
    buffers = [[b for m in unit for b in m.buffers()] for unit, _ in units]  # found once, not every step

    def forward(x: Tensor) -> Tensor:
        for (unit, kept), own in zip(units, buffers, strict=True):
            if kept and torch.is_grad_enabled():
                x = checkpoint(_unit_runner(unit, own), x, use_reentrant=False)
            else:
                for layer in unit:
                    x = layer(x)
        return x

    return forward


def checkpoint_layers(model: nn.Module) -> int:
    """Checkpoint every unit of `model`'s stacks (in place); the number of units checkpointed."""
    stacks = [getattr(model, name, None) for name in STACKS]
    if not all(isinstance(s, nn.Sequential) for s in stacks):
        raise ShardwiseError(
            "train.activation_checkpointing",
            f"layers needs the model's layers as a `features` then a `head` nn.Sequential; "
            f"{type(model).__name__} is not (see README, Your own model)",
        )
    count = 0
    for stack in stacks:
        units = stack_units(stack)
        count += sum(kept for _, kept in units)
        stack.forward = _checkpointed_forward(units)  # the instance's own: names and modules unchanged
    return count


def apply_checkpointing(part: Part, mode: str) -> Part:
    """`layers`: this rank's part checkpointed unit by unit (each of its pipeline stages'
    stacks, where it holds several); `none` leaves it as it came."""
    if mode == "none":
        return part
    if mode != "layers":  # auto reaches a rank resolved (the launcher's), or not at all
        raise ShardwiseError("train.activation_checkpointing", f"{mode!r} must be resolved to none or layers")
    stage = part.stage
    if stage is not None and len(stage.chunks) > 1:  # several stages a rank: each stage runs its own stacks
        return part.but(checkpointed=sum(checkpoint_layers(chunk) for _, chunk, _ in stage.chunks))
    return part.but(checkpointed=checkpoint_layers(part.model))

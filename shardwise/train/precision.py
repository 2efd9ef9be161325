"""Mixed precision: `train.precision = bf16` runs the forward of this rank's part of the
model under torch.autocast (bfloat16 matrix products and convolutions, on CPU and GPU),
while the weights, their gradients, the optimizer state and every gradient reduction
stay float32: the master weights are the float32 parameters themselves.

Autocast is entered by a forward pre-hook and left by a forward hook on the module the
layout runs (inside any data-parallel wrapper, or a pipeline stage), so every layout's
runner takes it without knowing; the output comes back as float32, so the loss (and a
pipeline's exchange of activations) is float32 too. The backward runs outside autocast, as
torch recommends. Evaluation (the module in eval mode) runs in float32: the accuracy
reported is the float32 weights'.
"""

from __future__ import annotations

import torch
from torch import nn


def autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> None:
    open_contexts: list = []

    def enter(mod: nn.Module, args) -> None:
        if mod.training:
            context = torch.autocast(device_type, dtype=dtype)
            context.__enter__()
            open_contexts.append(context)

    def leave(mod: nn.Module, args, out):
        if not open_contexts:
            return out
        open_contexts.pop().__exit__(None, None, None)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.float()
        return out

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)

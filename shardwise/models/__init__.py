"""Plain nn.Modules that know nothing about parallelism, and the registry that builds them.

Every model is a `features` stage (may be empty) followed by a `head` of
fully-connected layers, both `nn.Sequential`, so strategies applied from
outside (pipeline cuts, tensor-parallel heads) find the same structure in all.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from shardwise.config import ModelConfig
from shardwise.errors import ShardwiseError
from shardwise.models.convnet import ConvNet
from shardwise.models.mlp import MLP
from shardwise.models.resnet import ResNet

ModelBuilder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "mlp": lambda cfg, in_shape, classes: MLP(in_shape, classes, hidden=cfg.hidden),
    "convnet": lambda cfg, in_shape, classes: ConvNet(
        in_shape, classes, channels=cfg.channels, hidden=cfg.hidden, norm=cfg.norm
    ),
    "resnet": lambda cfg, in_shape, classes: ResNet(in_shape, classes, widths=cfg.channels, norm=cfg.norm),
}


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.name not in MODELS:
        raise ShardwiseError("model.name", f"unknown model {cfg.name!r}; known: {', '.join(MODELS)}")
    if cfg.name in ("convnet", "resnet") and len(in_shape) != 3:
        raise ShardwiseError("model.name", f"{cfg.name} needs images (C, H, W), the data has shape {in_shape}")
    return MODELS[cfg.name](cfg, tuple(in_shape), num_classes)

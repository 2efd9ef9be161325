"""Plain nn.Modules that know nothing about parallelism, the registry that builds them,
and your own models, named by an import path `package.module:function`.

Every built-in model is a `features` stage (may be empty) followed by a `head` of
fully-connected layers, both `nn.Sequential`, so strategies applied from outside
(pipeline cuts, tensor-parallel heads) find the same structure in all. Your own
model may be any nn.Module: data parallelism, FSDP2 and ZeRO-1 take it as it is;
the strategies that cut it need that same structure where they cut (README, "Your
own model"), and say so in one line where it is missing.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from shardwise.config import ModelConfig
from shardwise.errors import ShardwiseError
from shardwise.models.bag import Bag
from shardwise.models.convnet import ConvNet
from shardwise.models.mlp import MLP
from shardwise.models.resnet import ResNet
from shardwise.own_code import call_own

ModelBuilder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "mlp": lambda cfg, in_shape, classes: MLP(in_shape, classes, hidden=cfg.hidden),
    "convnet": lambda cfg, in_shape, classes: ConvNet(
        in_shape, classes, channels=cfg.channels, hidden=cfg.hidden, norm=cfg.norm
    ),
    "resnet": lambda cfg, in_shape, classes: ResNet(in_shape, classes, widths=cfg.channels, norm=cfg.norm),
    "bag": lambda cfg, in_shape, classes: Bag(in_shape, classes, hidden=cfg.hidden),
}


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if ":" in cfg.name:
        return _build_own(cfg, tuple(in_shape), num_classes)
    if cfg.name not in MODELS:
        raise ShardwiseError("model.name", f"unknown model {cfg.name!r}; known: {', '.join(MODELS)}")
    if cfg.name in ("convnet", "resnet") and len(in_shape) != 3:
        raise ShardwiseError("model.name", f"{cfg.name} needs images (C, H, W), the data has shape {in_shape}")
    if cfg.name == "bag" and len(in_shape) != 1:
        raise ShardwiseError(
            "model.name", f"bag needs flat word features (a text source), the data has shape {in_shape}"
        )
    return MODELS[cfg.name](cfg, tuple(in_shape), num_classes)


def _build_own(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    shown = f"in_shape={in_shape}, num_classes={num_classes}, **model.options"
    model = call_own(cfg.name, "model.name", shown, in_shape, num_classes, **cfg.options)
    if not isinstance(model, nn.Module):
        raise ShardwiseError("model.name", f"{cfg.name} returned {type(model).__name__}, not an nn.Module")
    return model

from __future__ import annotations

from torch import Tensor, nn

from shardwise.models.mlp import fc_stack


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalisation after a convolution. Group norm works per sample, so any
    split of the batch across ranks computes the same thing as one process."""
    if kind == "group":
        return nn.GroupNorm(min(8, channels) if channels % min(8, channels) == 0 else 1, channels)
    return nn.Identity()


class ConvNet(nn.Module):
    """The convolutional classifier of the mission's worked example, scaled down:
    a stack of 3x3 convolutions (max-pooling after every second one while the
    image is still at least 2 pixels high) followed by a fully-connected head.
    With the defaults: 5 convolutions and 3 fully-connected layers.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        *,
        channels: list[int],
        hidden: list[int],
        norm: str = "none",
    ):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for i, out in enumerate(channels):
            layers += [nn.Conv2d(c, out, 3, padding=1), norm_layer(norm, out), nn.ReLU()]
            c = out
            if i % 2 == 1 and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.head = fc_stack(c * h * w, hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

from __future__ import annotations

from torch import Tensor, nn

from shardwise.models.convnet import norm_layer


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm_layer(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: a 3x3 stem, one basic block per width (downsampling from the
    second on), global average pooling and a linear classifier."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, *, widths: list[int], norm: str = "none"):
        super().__init__()
        c = in_shape[0]
        layers: list[nn.Module] = [
            nn.Conv2d(c, widths[0], 3, padding=1, bias=False),
            norm_layer(norm, widths[0]),
            nn.ReLU(),
        ]
        c = widths[0]
        for i, w in enumerate(widths):
            layers.append(BasicBlock(c, w, stride=1 if i == 0 else 2, norm=norm))
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

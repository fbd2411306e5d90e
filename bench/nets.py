"""A network that is not built in, for the bench's `--model nets:conv_bn` rows (a user's
`module:factory`): convolutions with BatchNorm and a global pool, on 28x28 grey images."""
from __future__ import annotations

from torch import nn


def conv_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(input_shape[0], 16, 1), *block(16, 32, 2), *block(32, 32, 1), *block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )

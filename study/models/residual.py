"""The deep residual stack and its parallel-shallow twin (Bermeitinger, Hrycej, Handschuh,
2023, "Make Deep Networks Shallow Again").

sequential: x_{k+1} = x_k + f_k(x_k)        parallel: y = x + sum_k f_k(x)
Both are built by the same code from the same module list, so their parameter counts are
equal and, under the same seed, their initial weights are identical.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import register
from .common import ConvNet, conv_unit


class ResidualNet(ConvNet):
    def __init__(self, in_channels: int, n_classes: int, layers: int, filters: int, kernel: int,
                 activation: str = "relu", batch_norm: bool = False, wiring: str = "sequential",
                 **skeleton):
        super().__init__(in_channels, n_classes, filters, kernel, activation, **skeleton)
        self.wiring = wiring
        self.blocks = nn.ModuleList(conv_unit(filters, kernel, activation, batch_norm)
                                    for _ in range(layers))

    def body(self, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        blocks = self.blocks if order is None else [self.blocks[i] for i in order]
        if self.wiring == "sequential":
            for f in blocks:
                x = x + f(x)
            return x
        out = x
        for f in blocks:
            out = out + f(x)
        return out


@register("sequential")
def sequential(**kw) -> ResidualNet:
    return ResidualNet(wiring="sequential", **kw)


@register("parallel", params_like="sequential")
def parallel(**kw) -> ResidualNet:
    return ResidualNet(wiring="parallel", **kw)

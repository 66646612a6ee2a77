"""Baseline without skips: x_{k+1} = f_k(x_k).

Same modules (and so the same parameter count) as `sequential`; only the identity path is
missing. In the lesion analysis it shows what removing a block does when nothing carries the
input past it.
"""
from __future__ import annotations

import torch.nn as nn

from . import register
from .common import ConvNet, conv_unit


class PlainNet(ConvNet):
    def __init__(self, in_channels: int, n_classes: int, layers: int, filters: int, kernel: int,
                 activation: str = "relu", batch_norm: bool = False,
                 **skeleton):
        super().__init__(in_channels, n_classes, filters, kernel, activation, **skeleton)
        self.blocks = nn.ModuleList(conv_unit(filters, kernel, activation, batch_norm)
                                    for _ in range(layers))


@register("plain")
def plain(**kw) -> PlainNet:
    return PlainNet(**kw)

"""A deep and a shallow base net, deeply fused (Wang, Wei, Zhang, Zeng, 2016, "Deeply-Fused
Nets").

The deep base net (the `layers` conv units) is cut into blocks of `fuse_every` units; the
shallow base net contributes one conv unit per block (`shallow="conv"`) or nothing
(`shallow="identity"`). At each fusion point the two outputs are summed and the sum feeds
the next block of both nets:
    x_b = D_b(x_{b-1}) + S_b(x_{b-1})
With S_b = identity this is a residual net whose branches are `fuse_every` convs long.

Choices:
- `layers` counts the deep net's convs only; blocks = ceil(layers / fuse_every), the last block
  holding the remainder. The shallow convs come on top (one per block, reported in n_params;
  use match_params for an equal budget).
- No activation after the sum (the paper's deep + shallow instance reads act(D + S)): as in
  `sequential`, f ends in the activation and the sum is left linear, so that the identity
  variant is exactly a residual net with long branches.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import register
from .common import ConvNet, conv_unit


class FusionBlock(nn.Module):
    def __init__(self, depth: int, filters: int, kernel: int, activation: str,
                 batch_norm: bool, shallow: str):
        super().__init__()
        if shallow not in ("conv", "identity"):
            raise ValueError(f"unknown shallow branch {shallow!r}; known: conv, identity")
        self.deep = nn.Sequential(*(conv_unit(filters, kernel, activation, batch_norm)
                                    for _ in range(depth)))
        self.shallow = (conv_unit(filters, kernel, activation, batch_norm) if shallow == "conv"
                        else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deep(x) + self.shallow(x)


class DeeplyFusedNet(ConvNet):
    def __init__(self, in_channels: int, n_classes: int, layers: int, filters: int, kernel: int,
                 activation: str = "relu", batch_norm: bool = False, fuse_every: int = 2,
                 shallow: str = "conv",
                 **skeleton):
        super().__init__(in_channels, n_classes, filters, kernel, activation, **skeleton)
        n_blocks = math.ceil(layers / fuse_every)
        self.blocks = nn.ModuleList(
            FusionBlock(min(fuse_every, layers - b * fuse_every), filters, kernel, activation,
                        batch_norm, shallow)
            for b in range(n_blocks))


@register("deeply_fused")
def deeply_fused(**kw) -> DeeplyFusedNet:
    return DeeplyFusedNet(**kw)

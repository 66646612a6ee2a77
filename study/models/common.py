"""Pieces every family shares: stem, conv unit f(x), head, and the ConvNet skeleton."""
from __future__ import annotations

import torch
import torch.nn as nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def conv_unit(filters: int, kernel: int, activation: str, batch_norm: bool) -> nn.Sequential:
    """f(x) = act([BN](conv(x))): filters -> filters, 'same' padding (even kernels too)."""
    layers: list[nn.Module] = [nn.Conv2d(filters, filters, kernel, padding="same",
                                         bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(filters))
    layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """stem conv (in -> filters) -> body -> global average pool -> linear head.

    Families subclass this and implement `body(x)`. `blocks` is the ModuleList of the
    body's units in depth order; the lesion analysis removes or swaps its entries through
    `body(x, order)` where a family supports it.
    """

    def __init__(self, in_channels: int, n_classes: int, filters: int, kernel: int,
                 activation: str):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, filters, kernel, padding="same"),
            ACTIVATIONS[activation]())
        self.head = nn.Linear(filters, n_classes)

    def body(self, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        """Apply the blocks one after another (families whose blocks hold the whole layer map:
        plain, highway, deeply_fused); wirings that differ override this."""
        for i in range(len(self.blocks)) if order is None else order:
            x = self.blocks[i](x)
        return x

    def forward(self, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        h = self.body(self.stem(x), order)
        return self.head(h.mean(dim=(2, 3)))

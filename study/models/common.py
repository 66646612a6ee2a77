"""Pieces every family shares: stem, conv unit f(x), head, and the ConvNet skeleton."""
from __future__ import annotations

import torch
import torch.nn as nn

from sweep.params import HEADS

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
    """stem conv (in -> filters) [-> max-pool] -> body -> head (flatten or GAP) -> linear.

    Families subclass this and implement `body(x)`. `blocks` is the ModuleList of the
    body's units in depth order; the lesion analysis removes or swaps its entries through
    `body(x, order)` where a family supports it.

    head = "flatten" feeds every position of the body's output to the linear classifier
    (the classic classifier of a stack of same-size convs): the classifier then sees the
    features where they are, so the parallel net's small receptive field does not handicap
    it the way a global average of channel means does (head = "gap"). `pool` downsamples
    once after the stem (max-pool, window = stride = pool), which makes the body cheaper and
    the flattened head smaller. Stem and head are built before the body, so twins that
    differ only in wiring draw identical initial weights.
    """

    def __init__(self, in_channels: int, n_classes: int, filters: int, kernel: int,
                 activation: str, head: str = "flatten", pool: int = 2,
                 image_size: tuple[int, int] | None = None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        stem: list[nn.Module] = [nn.Conv2d(in_channels, filters, kernel, padding="same"),
                                 ACTIVATIONS[activation]()]
        if pool > 1:
            stem.append(nn.MaxPool2d(pool))
        self.stem = nn.Sequential(*stem)
        self.head_kind, self.pool = head, pool
        if head == "flatten":
            if image_size is None:
                raise ValueError("the flatten head needs image_size=(height, width) of the inputs")
            h, w = (int(s) // pool for s in image_size)
            if h < 1 or w < 1:
                raise ValueError(f"pool {pool} leaves nothing of {image_size[0]}x{image_size[1]} "
                                 "images; use a smaller pool")
            self.head = nn.Linear(filters * h * w, n_classes)
        else:
            self.head = nn.Linear(filters, n_classes)

    def body(self, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        """Apply the blocks one after another (families whose blocks hold the whole layer map:
        plain, highway, deeply_fused); wirings that differ override this."""
        for i in range(len(self.blocks)) if order is None else order:
            x = self.blocks[i](x)
        return x

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The body's output (N, C, H, W) as the classifier's input."""
        return h.flatten(1) if self.head_kind == "flatten" else h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        return self.head(self.features(self.body(self.stem(x), order)))

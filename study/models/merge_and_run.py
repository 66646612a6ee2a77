"""Merge-and-run blocks over K streams (DMRNet: Zhao, Wang, Li, Tu, Zeng, 2016, "Deep
Convolutional Neural Networks with Merge-and-Run Mappings").

Every stream starts as the stem output. Per block, with stream inputs x_1..x_K:
    m = (1/K) sum_j x_j             (merge)
    x_j' = H_j(x_j) + m             (run), H_j = conv unit f
and after the last block the streams are summed. The linear part maps the stacked streams by
M = (1/K) 1 1^T (x) I, which is idempotent (M @ M = M): see `merge_matrix`.

Choices:
- `layers` is the total number of conv units, as for `sequential`: the paper's same-budget
  mapping turns each residual block into one branch of a merge-and-run block. So there are
  ceil(layers / K) blocks of K branches; when K does not divide `layers` the last block has
  fewer branches and its other streams get H = 0 (they just take m). The parameter count is
  then exactly that of `sequential` at the same settings, at about 1/K of its depth.
- No ReLU after the sums (the authors' code has one): our f already ends in the activation and
  `sequential` adds no activation after x + f(x) either, so the zoo differs only in wiring;
  it also keeps the run step exactly the linear idempotent map the paper analyses.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import register
from .common import ConvNet, conv_unit


def merge(streams: list[torch.Tensor]) -> torch.Tensor:
    """The merge step: the mean of the stream inputs."""
    return torch.stack(streams).mean(dim=0)


def merge_matrix(k: int, n: int = 1) -> torch.Tensor:
    """M = (1/K) 1 1^T (x) I_n, the linear map of a block whose branches output zero."""
    return torch.kron(torch.full((k, k), 1.0 / k), torch.eye(n))


class MergeAndRunBlock(nn.Module):
    def __init__(self, n_streams: int, n_branches: int, filters: int, kernel: int,
                 activation: str, batch_norm: bool):
        super().__init__()
        self.n_streams = n_streams
        self.branches = nn.ModuleList(conv_unit(filters, kernel, activation, batch_norm)
                                      for _ in range(n_branches))

    def forward(self, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        m = merge(streams)
        return [self.branches[j](x) + m if j < len(self.branches) else m
                for j, x in enumerate(streams)]


class MergeAndRunNet(ConvNet):
    def __init__(self, in_channels: int, n_classes: int, layers: int, filters: int, kernel: int,
                 activation: str = "relu", batch_norm: bool = False, branches: int = 2,
                 **skeleton):
        super().__init__(in_channels, n_classes, filters, kernel, activation, **skeleton)
        self.n_streams = branches
        n_blocks = math.ceil(layers / branches)
        self.blocks = nn.ModuleList(
            MergeAndRunBlock(branches, min(branches, layers - b * branches), filters, kernel,
                             activation, batch_norm)
            for b in range(n_blocks))

    def body(self, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        streams = [x] * self.n_streams
        for i in range(len(self.blocks)) if order is None else order:
            streams = self.blocks[i](streams)
        return torch.stack(streams).sum(dim=0)


@register("merge_and_run")
def merge_and_run(**kw) -> MergeAndRunNet:
    return MergeAndRunNet(**kw)

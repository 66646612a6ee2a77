"""The deep residual stack and its parallel-shallow twin (Bermeitinger, Hrycej, Handschuh,
2023, "Make Deep Networks Shallow Again").

sequential: x_{k+1} = x_k + f_k(x_k)        parallel: y = x + sum_k f_k(x)
Both are built by the same code from the same module list, so their parameter counts are
equal and, under the same seed, their initial weights are identical.

The parallel body runs in one of two ways (`parallel_body`), with the same parameters and
state_dict: "loop" (the default) applies the L units one by one; "wide" concatenates their
conv weights in the forward into one conv of L*F output channels, then BN and activation
per channel, then sums the L groups: one kernel launch per stage instead of L, which may
pay on a GPU (benchmarks/gpu.py measures it; on a CPU it was no faster).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register
from .common import ConvNet, conv_unit


class ResidualNet(ConvNet):
    def __init__(self, in_channels: int, n_classes: int, layers: int, filters: int, kernel: int,
                 activation: str = "relu", batch_norm: bool = False, wiring: str = "sequential",
                 **skeleton):
        super().__init__(in_channels, n_classes, filters, kernel, activation, **skeleton)
        self.wiring = wiring
        self.parallel_body = "loop"  # or "wide"; set by study.train from TrialOptions
        self.blocks = nn.ModuleList(conv_unit(filters, kernel, activation, batch_norm)
                                    for _ in range(layers))

    def body(self, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        blocks = self.blocks if order is None else [self.blocks[i] for i in order]
        if self.wiring == "sequential":
            for f in blocks:
                x = x + f(x)
            return x
        if self.parallel_body == "wide" and blocks:
            return x + self.wide_sum(list(blocks), x)
        out = x
        for f in blocks:
            out = out + f(x)
        return out

    def wide_sum(self, units: list[nn.Sequential], x: torch.Tensor) -> torch.Tensor:
        """sum_k f_k(x) as one conv of L*F outputs, BN and activation, then a sum over groups.

        BN normalises each channel on its own, so the L units' BNs are one BN over L*F
        channels with their parameters and running statistics concatenated; the statistics
        that F.batch_norm updates in the concatenated buffers are copied back to each unit.
        """
        convs = [u[0] for u in units]
        c0 = convs[0]
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias for c in convs]) if c0.bias is not None else None
        h = F.conv2d(x, weight, bias, c0.stride, c0.padding, c0.dilation)
        if isinstance(units[0][1], nn.BatchNorm2d):
            h = self._wide_batch_norm([u[1] for u in units], h)
        h = units[0][-1](h)  # the activation: the same elementwise module in every unit
        n, _, hh, ww = h.shape
        return h.view(n, len(units), -1, hh, ww).sum(dim=1)

    def _wide_batch_norm(self, bns: list[nn.BatchNorm2d], h: torch.Tensor) -> torch.Tensor:
        b0 = bns[0]
        mean = torch.cat([b.running_mean for b in bns])
        var = torch.cat([b.running_var for b in bns])
        out = F.batch_norm(h, mean, var, torch.cat([b.weight for b in bns]),
                           torch.cat([b.bias for b in bns]), self.training, b0.momentum, b0.eps)
        if self.training:
            with torch.no_grad():
                for b, m, v in zip(bns, mean.chunk(len(bns)), var.chunk(len(bns))):
                    b.running_mean.copy_(m)
                    b.running_var.copy_(v)
                    b.num_batches_tracked += 1
        return out


@register("sequential")
def sequential(**kw) -> ResidualNet:
    return ResidualNet(wiring="sequential", **kw)


@register("parallel", params_like="sequential")
def parallel(**kw) -> ResidualNet:
    return ResidualNet(wiring="parallel", **kw)

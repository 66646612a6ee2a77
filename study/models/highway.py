"""Highway layers (Srivastava, Greff, Schmidhuber, 2015, "Highway Networks") and the gate
variants of Greff, Srivastava, Schmidhuber (ICLR 2017, "Highway and Residual Networks learn
Unrolled Iterative Estimation").

    y = H(x) * T(x) + x * C(x),   H = conv unit f, T and C sigmoid convs (kernel `gate_kernel`)

    gate       T            C            gate convs per layer
    full       sigmoid      sigmoid      2
    coupled    sigmoid      1 - T        1   (the original Highway layer)
    c_only     1            sigmoid      1
    t_only     sigmoid      1            1
    residual   1            1            0   (internal: the residual layer x + f(x))

`gate_bias` is the initial bias of the transform gate T; an independent carry gate C starts at
-gate_bias. With the default -2 every variant therefore starts close to copying its input
(T ~ 0.12 and/or C ~ 0.88), which is what the negative bias is for; giving C the same negative
bias would make c_only start by mostly dropping x instead.
`residual` is not a sweep value: it exists so that tests (and users) can check that the
gated layer with T = C = 1 is exactly the `sequential` layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import register
from .common import ConvNet, conv_unit

GATES = ("full", "coupled", "c_only", "t_only", "residual")
_HAS_T = {"full", "coupled", "t_only"}
_HAS_C = {"full", "c_only"}


def _gate_conv(filters: int, kernel: int, bias: float) -> nn.Conv2d:
    # padding="same" keeps even gate kernels shape-preserving too (stride 1).
    conv = nn.Conv2d(filters, filters, kernel, padding="same")
    nn.init.constant_(conv.bias, bias)
    return conv


class HighwayLayer(nn.Module):
    def __init__(self, filters: int, kernel: int, activation: str, batch_norm: bool,
                 gate: str, gate_bias: float, gate_kernel: int):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown highway gate {gate!r}; known: {', '.join(GATES)}")
        self.gate = gate
        self.H = conv_unit(filters, kernel, activation, batch_norm)
        self.T = _gate_conv(filters, gate_kernel, gate_bias) if gate in _HAS_T else None
        self.C = _gate_conv(filters, gate_kernel, -gate_bias) if gate in _HAS_C else None

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(T(x), C(x)); a gate that the variant fixes to 1 is the float 1.0."""
        t = torch.sigmoid(self.T(x)) if self.T is not None else 1.0
        if self.gate == "coupled":
            c = 1.0 - t
        else:
            c = torch.sigmoid(self.C(x)) if self.C is not None else 1.0
        return t, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, c = self.gates(x)
        return self.H(x) * t + x * c


class HighwayNet(ConvNet):
    def __init__(self, in_channels: int, n_classes: int, layers: int, filters: int, kernel: int,
                 activation: str = "relu", batch_norm: bool = False, gate: str = "coupled",
                 gate_bias: float = -2.0, gate_kernel: int = 1,
                 **skeleton):
        super().__init__(in_channels, n_classes, filters, kernel, activation, **skeleton)
        self.blocks = nn.ModuleList(
            HighwayLayer(filters, kernel, activation, batch_norm, gate, gate_bias, gate_kernel)
            for _ in range(layers))


@register("highway")
def highway(**kw) -> HighwayNet:
    return HighwayNet(**kw)

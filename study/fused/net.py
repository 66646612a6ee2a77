"""K same-shape networks as one grouped network (horizontal fusion, HFTA-style).

Every parameter and buffer of the members is stacked into one tensor of shape (K, *solo
shape); the forward views them as grouped convolutions (groups = K), one BatchNorm over the
K*F channels (per channel, so per member: each member keeps its own running statistics),
and a batched matmul for the K heads. Member k's tensors are `stacked[name][k]`, so a
member goes back into its solo module with `write_back` and comes from one with `stack`.

Members may differ in architecture among sequential, parallel and plain, which differ only
in which tensor each unit reads, and in activation:
    sequential  cur <- cur + f(cur)          parallel  cur <- cur + f(x0)       plain  cur <- f(cur)
(cur starts at the body's input x0; the parallel sum is accumulated in the same order as its
solo loop). Where the group mixes them, each run of members of one wiring keeps its own
channel block of x0 and cur, and a unit's input is the blocks side by side: exact values, no
arithmetic (see `_body`). Activations apply per contiguous run of members.
`torch.func.vmap` is not used: it loses BatchNorm's running statistics.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import channels_last
from ..models.common import ACTIVATIONS


def _runs(flags: list, width: int) -> list[tuple]:
    """(flag, first channel, end channel) per run of members with equal flags, member k's
    channels being k * width ... (k + 1) * width."""
    runs: list[tuple] = []
    for k, flag in enumerate(flags):
        if runs and runs[-1][0] == flag:
            runs[-1] = (flag, runs[-1][1], (k + 1) * width)
        else:
            runs.append((flag, k * width, (k + 1) * width))
    return runs


class GroupedNet:
    """The K members' tensors, stacked, and the grouped forward of a training step.

    `members`: solo models (study.models ResidualNet or PlainNet) of one group key;
    `architectures`, `activations`: theirs, in the same order.
    """

    def __init__(self, members: list[nn.Module], architectures: list[str],
                 activations: list[str]):
        m0 = members[0]
        self.k = len(members)
        self.layers = len(m0.blocks)
        self.filters = m0.stem[0].out_channels
        self.batch_norm = any(isinstance(u, nn.BatchNorm2d) for u in m0.blocks[0]) \
            if self.layers else False
        self.pool = m0.pool
        self.head_kind = m0.head_kind
        self.kernel = m0.stem[0].kernel_size
        bn = m0.blocks[0][1] if self.batch_norm else None
        self.bn_momentum, self.bn_eps = (bn.momentum, bn.eps) if bn is not None else (0.1, 1e-5)
        self.param_names = [n for n, _ in m0.named_parameters()]
        self.buffer_names = [n for n, _ in m0.named_buffers()]
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.stack(members)
        # (activation module, first channel, end channel) per run of equal activations
        self.acts = [(ACTIVATIONS[name](), lo, hi)
                     for name, lo, hi in _runs(activations, self.filters)]
        # (architecture, first channel, end channel) per run of members of one wiring:
        # study.fused.train orders a group's members by wiring, so at most three runs
        self.wirings = _runs(architectures, self.filters)

    # -- the members' tensors -------------------------------------------------------------
    @torch.no_grad()
    def stack(self, members: list[nn.Module]) -> None:
        """(Re)take every tensor from the solo members: parameters become leaves that
        require grad, buffers plain tensors."""
        named = [dict(m.named_parameters()) for m in members]
        bufs = [dict(m.named_buffers()) for m in members]
        for n in self.param_names:
            self.params[n] = torch.stack([d[n].detach() for d in named]).requires_grad_(True)
        for n in self.buffer_names:
            self.buffers[n] = torch.stack([d[n].detach() for d in bufs]).clone()

    @torch.no_grad()
    def write_back(self, members: list[nn.Module], which: list[int] | None = None) -> None:
        """Copy member k's slice of every tensor into its solo module (for evaluation,
        checkpoints and weights, all in the solo format)."""
        for k in range(self.k) if which is None else which:
            m = members[k]
            for n, p in m.named_parameters():
                p.copy_(self.params[n][k])
            for n, b in m.named_buffers():
                b.copy_(self.buffers[n][k])

    def parameters(self) -> list[torch.Tensor]:
        return [self.params[n] for n in self.param_names]

    # -- the grouped forward --------------------------------------------------------------
    def _conv(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self.params[prefix + ".weight"]
        b = self.params.get(prefix + ".bias")
        return F.conv2d(x, w.flatten(0, 1), None if b is None else b.flatten(),
                        padding="same", groups=self.k)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if len(self.acts) == 1:
            return self.acts[0][0](h)
        return torch.cat([act(h[:, a:b]) for act, a, b in self.acts], dim=1)

    def _batch_norm(self, h: torch.Tensor, prefix: str, training: bool,
                    active: torch.Tensor | None) -> torch.Tensor:
        mean, var = (self.buffers[prefix + s] for s in (".running_mean", ".running_var"))
        if training and active is not None:  # frozen members keep their statistics
            new_mean, new_var = mean.clone(), var.clone()
        else:
            new_mean, new_var = mean, var
        # F.batch_norm updates the running statistics in place through these flat views
        out = F.batch_norm(h, new_mean.view(-1), new_var.view(-1),
                           self.params[prefix + ".weight"].flatten(),
                           self.params[prefix + ".bias"].flatten(),
                           training, self.bn_momentum, self.bn_eps)
        if training:
            tracked = self.buffers[prefix + ".num_batches_tracked"]
            if active is None:
                tracked += 1
            else:
                on = active.view(-1, 1)
                mean.copy_(torch.where(on, new_mean, mean))
                var.copy_(torch.where(on, new_var, var))
                tracked += active.to(tracked.dtype)
        return out

    def _body(self, h: torch.Tensor, training: bool, active: torch.Tensor | None
              ) -> torch.Tensor:
        """The residual units over the stem's output h. Each run of members of one wiring
        keeps its own x0 and cur (channel blocks of h); a unit's input is the runs' blocks
        side by side (x0's for parallel runs, cur's for the others), one grouped conv over
        all K, and its output splits back into the runs. The backward of torch.cat hands
        each block a view of the gradient and that of split is one torch.cat, where a
        per-channel torch.where padded both of its gradients to all K*F channels. Bit for
        bit the numbers of that torch.where. Measured (the demo's digits cells at layers 4,
        filters 8, K=8, batch 64, one thread; CPU time, least of 60 steps, on a loaded
        machine): a training step 16.3-16.5 ms with torch.where, 15.5-15.6 ms so."""
        sizes = [hi - lo for _, lo, hi in self.wirings]
        x0 = list(h.split(sizes, dim=1)) if len(sizes) > 1 else [h]
        cur = list(x0)
        for i in range(self.layers):
            blocks = [x if wiring == "parallel" else c
                      for (wiring, _, _), x, c in zip(self.wirings, x0, cur)]
            # (the first unit's blocks are h's own: x0 = cur = h)
            unit_in = h if i == 0 else (torch.cat(blocks, dim=1) if len(blocks) > 1
                                        else blocks[0])
            u = self._conv(unit_in, f"blocks.{i}.0")
            if self.batch_norm:
                u = self._batch_norm(u, f"blocks.{i}.1", training, active)
            u = self._act(u)
            us = u.split(sizes, dim=1) if len(sizes) > 1 else [u]
            cur = [v if wiring == "plain" else c + v
                   for (wiring, _, _), c, v in zip(self.wirings, cur, us)]
        return torch.cat(cur, dim=1) if len(cur) > 1 else cur[0]

    def forward(self, x: torch.Tensor, training: bool = True,
                active: torch.Tensor | None = None) -> torch.Tensor:
        """x: (K, B, C, H, W), member k's batch in x[k] -> logits (K, B, classes).
        `active` (bool, (K,)): in training, only those members' BatchNorm statistics move."""
        k, b = x.shape[:2]
        # the solo nets' layout, strides stated (with one channel per member .contiguous()
        # may keep NCHW strides, and the convolutions then pick other kernels: other rounding)
        h = channels_last(x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:]))
        h = self._act(self._conv(h, "stem.0"))
        if self.pool > 1:
            h = F.max_pool2d(h, self.pool)
        cur = self._body(h, training, active)
        w, bias = self.params["head.weight"], self.params["head.bias"]
        if self.head_kind == "flatten":
            # Member k's features in the body's channels-last order (position, then its F
            # channels: a copy of F-float runs) against its weight's columns permuted to that
            # order, instead of the solo nets' (channel, position) order, whose copy is a
            # per-element transpose in the forward and again in the backward (measured at
            # K=8, filters 8, 8x8, batch 64: 0.97 ms against 1.42 ms, forward and backward).
            # Only the order of the logits' sum differs (2.5e-7 relative).
            hw = cur.shape[2] * cur.shape[3]
            feats = cur.permute(0, 2, 3, 1).reshape(b, hw, k, self.filters)
            feats = feats.permute(2, 0, 1, 3).reshape(k, b, hw * self.filters)
            w = w.view(k, -1, self.filters, hw).transpose(2, 3).reshape(k, -1, hw * self.filters)
        else:
            if torch.is_grad_enabled() and cur.requires_grad:
                # the mean's backward hands back an expanded gradient: in the channels-last
                # body every elementwise backward would then walk mixed strides (measured:
                # relu's backward 10x slower); the same values in the body's layout
                cur.register_hook(lambda g: g.contiguous(memory_format=torch.channels_last))
            feats = cur.mean(dim=(2, 3)).view(b, k, -1).transpose(0, 1)
        # (W x^T)^T: autograd then forms the weight's gradient as grad^T x, the product
        # F.linear's backward takes (x W^T gave the same logits but a gradient rounded apart)
        return torch.baddbmm(bias.unsqueeze(2), w, feats.transpose(1, 2)).transpose(1, 2)

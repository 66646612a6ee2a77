"""Multi-branch residual blocks whose connections between neighbouring blocks are learned
(MaskConnect: Ahmed, Torresani, 2017, "Connectivity Learning in Multi-Branch Networks").

Each block has C = `branches` branches (conv units). Branch i of block b reads the sum of
exactly K = `active_inputs` of the previous block's branch outputs, picked by a binary mask
row; the identity path carries the rest:
    u_b^i = s_{b-1} + sum_k m_b[i, k] y_{b-1}^k,       y_b^i = F_b^i(u_b^i)
    s_b   = s_{b-1} + sum_k used_b[k] y_{b-1}^k,        used_b[k] = max_i m_b[i, k]
    (block 1 reads s_0 = stem output;  output = s_{B-1} + sum_k y_B^k)
With K = C every mask is all ones and this is the all-connected ResNeXt-style stack
x_b = x_{b-1} + sum_i F_b^i(x_{b-1}). A branch that no branch of the next block selects
reaches nothing (not even the identity path) and is pruned: `pruned_branches` counts them.

Mask learning (constants ours; the paper's are unverified): every row of a block's real-valued
mask starts uniform (1/C). Training forward: sample K entries of the row without replacement,
with probabilities given by the row (torch's global RNG), and use the binary mask; backward:
its gradient passes straight through to the real mask. `after_step()` (after each optimiser
step) clips to [0, 1] and renormalises each row to sum 1. `on_epoch_start(epoch, epochs)`
freezes the masks to their top-K for the last quarter of the epochs (at least one epoch
when epochs >= 3), while the weights keep training; eval mode always uses the top-K.

`layers` -> blocks: `layers` blocks of C branches each, so every path through the net is
`layers` convs deep like `sequential`, and the body holds C times its convs (ResNeXt compares
at equal depth and cardinality). n_params is reported; match_params gives an equal budget.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import register
from .common import ConvNet, conv_unit


class ConnectivityBlock(nn.Module):
    def __init__(self, n_branches: int, filters: int, kernel: int, activation: str,
                 batch_norm: bool, with_mask: bool):
        super().__init__()
        self.branches = nn.ModuleList(conv_unit(filters, kernel, activation, batch_norm)
                                      for _ in range(n_branches))
        # mask[i, k]: how much branch i of this block wants output k of the previous block.
        self.mask = (nn.Parameter(torch.full((n_branches, n_branches), 1.0 / n_branches))
                     if with_mask else None)
        self.cached_selection = None  # (mask version, rows, used): see selection()


class LearnedConnectivityNet(ConvNet):
    freeze_fraction = 0.25

    def __init__(self, in_channels: int, n_classes: int, layers: int, filters: int, kernel: int,
                 activation: str = "relu", batch_norm: bool = False, branches: int = 4,
                 active_inputs: int | None = None,
                 **skeleton):
        super().__init__(in_channels, n_classes, filters, kernel, activation, **skeleton)
        k = max(1, branches // 2) if active_inputs is None else active_inputs
        if not 1 <= k <= branches:
            raise ValueError(f"learned_connectivity needs 1 <= active_inputs <= branches, "
                             f"got active_inputs={k}, branches={branches}")
        self.n_branches, self.active_inputs = branches, k
        self.frozen = False
        self.blocks = nn.ModuleList(
            ConnectivityBlock(branches, filters, kernel, activation, batch_norm, with_mask=b > 0)
            for b in range(layers))

    # -- masks ------------------------------------------------------------------------------
    @property
    def learning_masks(self) -> bool:
        return self.training and not self.frozen

    def binary_mask(self, block: ConnectivityBlock) -> torch.Tensor:
        """The (C, C) 0/1 mask of a forward pass: sampled with a straight-through gradient
        while the masks learn, else the top-K."""
        m = block.mask
        if self.learning_masks:
            # A tiny floor keeps sampling K distinct entries possible when a row has fewer
            # than K non-zero entries.
            idx = torch.multinomial(m.detach() + 1e-6, self.active_inputs, replacement=False)
            hard = torch.zeros_like(m).scatter_(1, idx, 1.0)
            return hard + (m - m.detach())  # forward value exactly `hard`, gradient to m
        idx = m.detach().topk(self.active_inputs, dim=1).indices
        return torch.zeros_like(m).scatter_(1, idx, 1.0)

    def selection(self, block: ConnectivityBlock) -> tuple[list[list[int]], list[int]]:
        """Top-K as index lists: (inputs chosen by each branch, outputs anyone chose).

        Cached per version of the mask tensor (bumped by every in-place change: optimiser
        step, after_step, load_state_dict), so a GPU syncs once per mask change, not per pass.
        """
        key = block.mask._version
        if block.cached_selection is None or block.cached_selection[0] != key:
            rows = block.mask.detach().topk(self.active_inputs, dim=1).indices.cpu().tolist()
            used = sorted({k for row in rows for k in row})
            block.cached_selection = (key, rows, used)
        return block.cached_selection[1], block.cached_selection[2]

    @torch.no_grad()
    def after_step(self) -> None:
        """Project every mask row back onto {m in [0,1]^C, sum m = 1}; call after each step."""
        if self.frozen:
            return  # frozen masks get no gradient and stay as they are
        for block in self.blocks[1:]:
            m = block.mask
            m.clamp_(0.0, 1.0)
            total = m.sum(dim=1, keepdim=True)
            m.copy_(torch.where(total > 0, m / total.clamp_min(1e-12),
                                torch.full_like(m, 1.0 / m.shape[1])))

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Freeze the masks to their top-K for the last quarter of training (epoch 1-based)."""
        n_frozen = max(1, int(epochs * self.freeze_fraction)) if epochs >= 3 else 0
        self.frozen = epoch > epochs - n_frozen

    @property
    def pruned_branches(self) -> int:
        """Branches whose output no branch of the next block selects (under the top-K masks)."""
        return sum(self.n_branches - len(self.selection(block)[1]) for block in self.blocks[1:])

    # -- forward ----------------------------------------------------------------------------
    def body(self, x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        if order is not None and list(order) != list(range(len(self.blocks))):
            raise ValueError("learned_connectivity wires each block to the learned outputs of "
                             "the previous one; its blocks cannot be dropped or reordered")
        s, ys = x, None
        for block in self.blocks:
            if ys is None:
                inputs = [s] * self.n_branches
            elif self.learning_masks:
                # Dense products: the straight-through gradient of every mask entry, chosen or
                # not, is <dL/du_i, y_k>; and no host sync on a GPU.
                hard = self.binary_mask(block)
                stacked = torch.stack(ys)  # (C, N, F, H, W)
                inputs = list(s + torch.einsum("ik,k...->i...", hard, stacked))
                s = s + torch.einsum("k,k...->...", hard.detach().amax(dim=0), stacked)
            else:
                # Fixed top-K: add only the chosen outputs (C*K adds instead of a C*C product).
                rows, used = self.selection(block)
                inputs = [s + sum(ys[k] for k in row) for row in rows]
                s = s + sum(ys[k] for k in used)
            ys = [f(u) for f, u in zip(block.branches, inputs)]
        return s if ys is None else s + torch.stack(ys).sum(dim=0)


@register("learned_connectivity")
def learned_connectivity(**kw) -> LearnedConnectivityNet:
    return LearnedConnectivityNet(**kw)

"""A fused training step captured in a CUDA graph: one graph launch replays a whole step.

NOT YET RUN ON A GPU. Written against torch 2.14's torch.cuda.CUDAGraph / torch.cuda.graph
API (whole-network capture, as the "CUDA Graphs" section of torch's CUDA semantics notes
describes it) on a machine without one; only its CPU path (the same step on static buffers,
no capture) is tested (tests/test_fuse_bench.py). benchmarks/gpu.py runs it and prints
`check()`'s figures: trust the graphed mode once those read ~0 on a GPU.

Why: a fused step of the paper's small nets is a few hundred small kernels; launching them
costs more host time than their arithmetic takes on a GPU. Captured once, a step is one
launch. What capture needs, and how this meets it:
  - static memory: the step reads its batch from static buffers, the index buffer `idx`
    (K, B) and the gathered batch `xb` (K, B, C, H, W) / `yb` (K, B), refilled before each
    replay by one device copy; its outputs (per-member loss sum, correct count, `active`)
    accumulate in place in static tensors.
  - no host syncs: GroupedAdamW keeps lr, weight decay, step counts and `active` on the
    device (its equivalent of AdamW's capturable=True); divergence only masks updates on the
    device, as study.fused.train.epoch_steps does on a GPU.
  - gradients keep their addresses: zeroed in place inside the graph (zero_grad with
    set_to_none=False), so backward accumulates into the tensors the graph recorded.
  - warm-up on a side stream before capture (cuBLAS/cuDNN workspaces, autograd's lazy
    state), as torch.cuda.graphs requires; the state before warm-up is restored in place
    afterwards, so capturing changes no weight.
  - bf16 autocast runs with cache_enabled=False (autocast's weight-cast cache does not
    survive capture).
  - shapes are fixed: the short last batch of an epoch (n % B examples) runs eagerly, the
    same step on tensors of its own shape.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .adamw import GroupedAdamW
from .net import GroupedNet


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def fused_step(net: GroupedNet, opt: GroupedAdamW, xb: torch.Tensor, yb: torch.Tensor,
               active: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor,
               precision: str = "fp32") -> None:
    """One fused optimizer step, all on the device, outputs in place: the arithmetic of
    study.fused.train.epoch_steps' GPU path (masked by `active`), with gradients zeroed in
    place instead of set to None (0 + g is g exactly, so the values are the same)."""
    k = xb.shape[0]
    with _autocast(precision, xb.device):
        logits = net.forward(xb, training=True, active=active)
        losses = F.cross_entropy(logits.flatten(0, 1), yb.flatten(),
                                 reduction="none").view(k, -1).mean(1)
    active.logical_and_(torch.isfinite(losses.detach()))
    opt.zero_grad(set_to_none=False)
    torch.where(active, losses, torch.zeros_like(losses)).sum().backward()
    opt.step(active)
    live = losses.detach().float() * xb.shape[1]
    loss_sum.add_(torch.where(active, live, torch.zeros_like(live)))
    correct.add_((logits.argmax(2) == yb).sum(1))


class GraphedStep:
    """The fused step of (net, opt) over the data (x, y) at batch size B, captured in a CUDA
    graph (`graph=True`, CUDA only) or run on the same static buffers without one (the CPU
    path: the plumbing, testable anywhere).

    Per epoch: `train_epoch(perms)` (member k's order perms[k], (K, n)) replays the graph
    for each full batch and runs the short last batch eagerly; `take()` returns and resets
    (summed loss, correct count) and the members still active.
    """

    def __init__(self, net: GroupedNet, opt: GroupedAdamW, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int, precision: str = "fp32", graph: bool = True,
                 active: torch.Tensor | None = None, warmup: int = 3):
        if graph and x.device.type != "cuda":
            raise ValueError("a CUDA graph needs the data on a CUDA device")
        self.net, self.opt, self.x, self.y = net, opt, x, y
        self.batch_size, self.precision, self.k = batch_size, precision, net.k
        device = x.device
        self.idx = torch.zeros(self.k, batch_size, dtype=torch.long, device=device)
        self.xb = torch.zeros(self.k, batch_size, *x.shape[1:], dtype=x.dtype, device=device)
        self.yb = torch.zeros(self.k, batch_size, dtype=y.dtype, device=device)
        self.active = (torch.ones(self.k, dtype=torch.bool, device=device) if active is None
                       else active.to(device=device, dtype=torch.bool).clone())
        self.loss_sum = torch.zeros(self.k, device=device)
        self.correct = torch.zeros(self.k, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._ensure_grads()
        if graph:
            self._capture(warmup)

    # -- state -------------------------------------------------------------------------
    def _ensure_grads(self) -> None:
        """Gradient tensors allocated up front, outside any graph pool: every step (graphed
        or eager) zeroes and fills these same tensors."""
        for p in self.opt.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _tensors(self) -> list[torch.Tensor]:
        """Everything a step changes (in place)."""
        return (list(self.net.params.values()) + list(self.net.buffers.values())
                + self.opt.exp_avg + self.opt.exp_avg_sq
                + [self.opt.step_count, self.active, self.loss_sum, self.correct])

    @torch.no_grad()
    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self._tensors()]

    @torch.no_grad()
    def restore(self, saved: list[torch.Tensor]) -> None:
        """Back to a snapshot, in place: the graph keeps reading the same addresses."""
        for t, s in zip(self._tensors(), saved):
            t.copy_(s)

    # -- steps -------------------------------------------------------------------------
    def _static_step(self) -> None:
        with torch.no_grad():
            torch.index_select(self.x, 0, self.idx.view(-1),
                               out=self.xb.view(-1, *self.x.shape[1:]))
            torch.index_select(self.y, 0, self.idx.view(-1), out=self.yb.view(-1))
        fused_step(self.net, self.opt, self.xb, self.yb, self.active, self.loss_sum,
                   self.correct, self.precision)

    def _capture(self, warmup: int) -> None:
        saved = self.snapshot()
        self.idx.copy_(torch.arange(self.batch_size, device=self.idx.device).expand(self.k, -1))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self._static_step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._static_step()
        # capture recorded the kernels without running them; the warm-up did run: undo it
        self.restore(saved)

    def step(self, idx: torch.Tensor) -> None:
        """One step over x[idx] (idx: (K, b)): a graph replay when b is the captured batch
        size, else (the short last batch) the same step eagerly."""
        if idx.shape[1] == self.batch_size:
            self.idx.copy_(idx)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._static_step()
            return
        fused_step(self.net, self.opt, self.x[idx], self.y[idx], self.active, self.loss_sum,
                   self.correct, self.precision)

    def step_eager(self, idx: torch.Tensor) -> None:
        """The same step without the graph or the static buffers (the reference)."""
        fused_step(self.net, self.opt, self.x[idx], self.y[idx], self.active, self.loss_sum,
                   self.correct, self.precision)

    def train_epoch(self, perms: torch.Tensor) -> None:
        for i in range(0, perms.shape[1], self.batch_size):
            self.step(perms[:, i:i + self.batch_size])

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, correct count, active) since the last take; resets the sums."""
        out = self.loss_sum.clone(), self.correct.clone(), self.active.clone()
        self.loss_sum.zero_()
        self.correct.zero_()
        return out

    # -- the equality check ----------------------------------------------------------------
    @torch.no_grad()
    def _params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.opt.params]

    def check(self, perms: torch.Tensor, steps: int = 3) -> dict:
        """The graphed step against the eager one from the same state: `steps` full batches
        of `perms` each way; per updated weight tensor ||graphed - eager|| / ||eager||.
        Returns {"max_rel": worst tensor, "loss_rel": of the summed losses, "steps": n}; the
        state is left as it was."""
        saved = self.snapshot()
        b = self.batch_size
        batches = [perms[:, i * b:(i + 1) * b] for i in range(steps)
                   if (i + 1) * b <= perms.shape[1]]
        for idx in batches:
            self.step_eager(idx)
        eager, eager_loss = self._params(), self.loss_sum.clone()
        self.restore(saved)
        for idx in batches:
            self.step(idx)
        graphed, graphed_loss = self._params(), self.loss_sum.clone()
        self.restore(saved)

        def rel(a: torch.Tensor, e: torch.Tensor) -> float:
            den = float(e.double().norm())
            num = float((a.double() - e.double()).norm())
            return num / den if den > 0 else (0.0 if num == 0 else math.inf)

        return {"max_rel": max(rel(a, e) for a, e in zip(graphed, eager)),
                "loss_rel": rel(graphed_loss, eager_loss), "steps": len(batches)}


__all__ = ["GraphedStep", "fused_step"]

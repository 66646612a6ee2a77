"""AdamW over stacked parameters, with a learning rate, a weight decay, a step count and an
"active" flag per member.

torch's AdamW takes one learning rate for all its parameters, so a group whose members differ
in lr or weight decay needs its own. This is torch's single-tensor AdamW (decoupled weight
decay, no amsgrad) written with per-member tensors broadcast over each stacked parameter of
shape (K, ...). Every quantity is a device tensor, so a step never waits for the host and
can be captured in a CUDA graph. A member whose `active` flag is off keeps its parameters and
state as they are (a diverged member is frozen while the others go on). Its state converts to
and from each member's own `torch.optim.AdamW` state_dict, so checkpoints stay solo-format.
"""
from __future__ import annotations

import torch


class GroupedAdamW:
    def __init__(self, params: list[torch.Tensor], lr: list[float], weight_decay: list[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = params
        device = params[0].device
        k = self.k = len(lr)
        # float64, as the Python floats torch's AdamW computes its scalars in: each member's
        # scalars then round to the very float32 values its solo AdamW uses
        self.lr = torch.tensor(lr, dtype=torch.float64, device=device)
        self.weight_decay = torch.tensor(weight_decay, dtype=torch.float64, device=device)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = torch.zeros(k, dtype=torch.float32, device=device)
        # The moments of all parameters in one (K, P) tensor each, a step being a dozen
        # operations over it instead of a dozen per parameter (the ops' count, not their
        # size, is what a small net's step costs: measured below); exp_avg[i] and
        # exp_avg_sq[i] are views of parameter i's columns, shaped like it.
        self.sizes = [p[0].numel() for p in params]
        self.flat_avg = torch.zeros(k, sum(self.sizes), device=device)
        self.flat_avg_sq = torch.zeros_like(self.flat_avg)
        self.exp_avg = self._views(self.flat_avg)
        self.exp_avg_sq = self._views(self.flat_avg_sq)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [part.view(p.shape) for part, p in zip(flat.split(self.sizes, dim=1), self.params)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        """One AdamW step of every member; with `active` (bool, (K,)), only of those."""
        if active is None:
            self.step_count += 1
        else:
            self.step_count += active.to(self.step_count.dtype)
        step = self.step_count.clamp(min=1).double()  # clamp: frozen before its first step
        # torch's single-tensor AdamW: lr / (1 - beta1**step), (1 - beta2**step) ** 0.5 and
        # 1 - lr * weight_decay in double, used as float32
        step_size = (self.lr / (1 - torch.pow(self.beta1, step))).float()
        bias2_sqrt = torch.pow(1 - torch.pow(self.beta2, step), 0.5).float()
        decay = (1 - self.lr * self.weight_decay).float()
        if any(p.grad is None for p in self.params):
            raise RuntimeError("GroupedAdamW.step: every stacked parameter needs a gradient "
                               "(each member's loss reaches all of its parameters)")
        # torch's AdamW, elementwise, on every parameter at once: the same operations on the
        # same floats as parameter by parameter, so the same bits
        g = torch.cat([p.grad.reshape(self.k, -1) for p in self.params], dim=1)
        p = torch.cat([p.detach().reshape(self.k, -1) for p in self.params], dim=1)
        m, v = self.flat_avg, self.flat_avg_sq
        col = lambda t: t.view(-1, 1)  # noqa: E731 - a per-member scalar over its columns
        if active is None:
            p.mul_(col(decay))
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / col(bias2_sqrt)).add_(self.eps)
            p.sub_(col(step_size) * m / denom)
        else:
            # the same operations on copies, so an active member's numbers are bit for bit
            # those of a group where nobody is frozen; a frozen member's stay as they are
            on = col(active)
            new_p = p.mul(col(decay))
            m.copy_(torch.where(on, m.lerp(g, 1 - self.beta1), m))
            v.copy_(torch.where(on, v.mul(self.beta2).addcmul_(g, g, value=1 - self.beta2), v))
            denom = (v.sqrt() / col(bias2_sqrt)).add_(self.eps)
            new_p.sub_(col(step_size) * m / denom)
            p = torch.where(on, new_p, p)
        torch._foreach_copy_([q.detach() for q in self.params],
                             [part.view(q.shape) for part, q in zip(p.split(self.sizes, dim=1),
                                                                     self.params)])

    # -- solo-format state -----------------------------------------------------------------
    @torch.no_grad()
    def member_state(self, k: int, solo: torch.optim.AdamW) -> dict:
        """Member k's state as `solo` (an AdamW over the member's own parameters, in the
        same order) would hold it; returns solo.state_dict()."""
        solo.state.clear()
        steps = float(self.step_count[k])
        if steps > 0:
            for sp, m, v in zip(solo.param_groups[0]["params"], self.exp_avg, self.exp_avg_sq):
                solo.state[sp] = {"step": torch.tensor(steps, dtype=torch.float32),
                                  "exp_avg": m[k].detach().clone(),
                                  "exp_avg_sq": v[k].detach().clone()}
        return solo.state_dict()

    @torch.no_grad()
    def load_member(self, k: int, solo: torch.optim.AdamW) -> None:
        """Member k's state from `solo`, an AdamW that loaded the member's checkpoint."""
        params = solo.param_groups[0]["params"]
        if not params or params[0] not in solo.state:
            return  # never stepped
        self.step_count[k] = float(solo.state[params[0]]["step"])
        for sp, m, v in zip(params, self.exp_avg, self.exp_avg_sq):
            m[k].copy_(solo.state[sp]["exp_avg"])
            v[k].copy_(solo.state[sp]["exp_avg_sq"])

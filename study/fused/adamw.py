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
        k = len(lr)
        # float64, as the Python floats torch's AdamW computes its scalars in: each member's
        # scalars then round to the very float32 values its solo AdamW uses
        self.lr = torch.tensor(lr, dtype=torch.float64, device=device)
        self.weight_decay = torch.tensor(weight_decay, dtype=torch.float64, device=device)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = torch.zeros(k, dtype=torch.float32, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @staticmethod
    def _per_member(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (like.dim() - 1)))

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
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            g = p.grad
            if g is None:
                continue
            shape = lambda t: self._per_member(t, p)  # noqa: E731
            if active is None:
                p.mul_(shape(decay))
                m.lerp_(g, 1 - self.beta1)
                v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = (v.sqrt() / shape(bias2_sqrt)).add_(self.eps)
                p.sub_(shape(step_size) * m / denom)
                continue
            # the same operations as above, on copies, so an active member's numbers are
            # bit for bit those of a group where nobody is frozen
            on = shape(active)
            new_p = p.mul(shape(decay))
            m.copy_(torch.where(on, m.lerp(g, 1 - self.beta1), m))
            v.copy_(torch.where(on, v.mul(self.beta2).addcmul_(g, g, value=1 - self.beta2), v))
            denom = (v.sqrt() / shape(bias2_sqrt)).add_(self.eps)
            new_p.sub_(shape(step_size) * m / denom)
            p.copy_(torch.where(on, new_p, p))

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

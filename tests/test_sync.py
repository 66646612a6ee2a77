"""No host synchronisation per training step on a GPU: the loss, accuracy and divergence
checks stay on the device until the epoch ends (train.train_steps under
torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising call)."""
from __future__ import annotations

import pytest
import torch

from study.models import build_for_cell
from study.train import set_precision, train_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: on a CPU there is no device to sync with")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("architecture", ["sequential", "parallel", "learned_connectivity"])
def test_training_steps_do_not_sync(architecture, precision):
    config = {"dataset": "mnist", "architecture": architecture, "layers": 2, "filters": 8,
              "kernel": 3, "batch_norm": True, "pool": 2, "seed": 0}
    set_precision(precision)
    torch.manual_seed(0)
    model, _ = build_for_cell(config, 1, 10)
    model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(512, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (512,), device="cuda")
    perm = torch.randperm(512, device="cuda")
    train_steps(model, opt, x, y, perm, 128, precision)  # warm-up: lazy state, cuDNN plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_sum, correct, loss = train_steps(model, opt, x, y, perm, 128, precision)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss_sum.is_cuda and correct.is_cuda
    assert torch.isfinite(loss_sum).item() and 0 <= correct.item() <= 512


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_epoch_steps_do_not_sync(precision):
    """A fused group's steps (study.fused.train.epoch_steps): the divergence mask, the
    per-member AdamW and the loss sums all stay on the device."""
    from study.fused.adamw import GroupedAdamW
    from study.fused.net import GroupedNet
    from study.fused.train import epoch_steps

    set_precision(precision)
    members, archs = [], ["sequential", "parallel", "plain", "parallel"]
    for seed, arch in enumerate(archs):
        torch.manual_seed(seed)
        config = {"dataset": "mnist", "architecture": arch, "layers": 2, "filters": 8,
                  "kernel": 3, "batch_norm": True, "pool": 2, "seed": seed}
        members.append(build_for_cell(config, 1, 10)[0].cuda())
    net = GroupedNet(members, archs, ["relu", "tanh", "relu", "gelu"])
    opt = GroupedAdamW(net.parameters(), [1e-3, 2e-3, 1e-3, 5e-4], [1e-4, 0.0, 1e-4, 1e-2])
    x = torch.randn(512, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (512,), device="cuda")
    perms = torch.stack([torch.randperm(512, device="cuda") for _ in archs])
    active = torch.ones(len(archs), dtype=torch.bool, device="cuda")
    epoch_steps(net, opt, x, y, perms, 128, precision, active)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_sum, correct, active = epoch_steps(net, opt, x, y, perms, 128, precision, active)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss_sum.is_cuda and active.is_cuda and bool(active.all())
    assert torch.isfinite(loss_sum).all().item() and (correct <= 512).all().item()

"""The wide parallel body (one conv of L*F outputs, BN and activation, a sum over the groups)
is the branch loop: same state_dict, outputs, gradients and one AdamW step, within float
tolerance, for layers 1-4, with and without batch norm, every activation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from study.models import build
from sweep.params import ACTIVATIONS


def _pair(layers: int, batch_norm: bool, activation: str):
    torch.manual_seed(0)
    loop = build("parallel", in_channels=1, n_classes=10, layers=layers, filters=6, kernel=3,
                 activation=activation, batch_norm=batch_norm, head="flatten", pool=1,
                 image_size=(8, 8))
    if batch_norm:  # running statistics off their init, so eval mode tests them too
        for m in loop.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    wide = copy.deepcopy(loop)
    wide.parallel_body = "wide"
    return loop, wide


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_wide_body_equals_the_loop(layers, batch_norm, activation):
    loop, wide = _pair(layers, batch_norm, activation)
    sd_l, sd_w = loop.state_dict(), wide.state_dict()
    assert list(sd_l) == list(sd_w) and all(sd_l[k].shape == sd_w[k].shape for k in sd_l)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-4) for m in (loop, wide)]
    for step in range(2):
        outs = []
        for m, opt in zip((loop, wide), opts):
            m.train()
            out = m(x)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(out, y).backward()
            outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
            opt.step()
        assert _close(outs[0][0], outs[1][0]), "training-mode outputs"
        for name, grad in outs[0][1].items():
            assert _close(grad, outs[1][1][name]), f"gradient of {name} at step {step}"
    # after the optimizer steps: the same weights and (BN) running statistics
    for k, v in loop.state_dict().items():
        assert torch.allclose(v.float(), wide.state_dict()[k].float(), rtol=1e-5, atol=1e-6), k
    loop.eval(), wide.eval()
    with torch.no_grad():
        assert _close(loop(x), wide(x)), "eval-mode outputs"
        # a lesion's order (a subset of the blocks) runs the wide body over that subset
        if layers > 1:
            order = list(range(1, layers))
            assert _close(loop(x, order), wide(x, order))


def test_wide_body_is_recorded_when_chosen(tmp_path):
    from study.options import TrialOptions
    from study.train import run_cell
    from sweep import Cell

    cfg = {"dataset": "digits", "architecture": "parallel", "layers": 3, "filters": 4,
           "kernel": 3, "epochs": 1, "batch_size": 64, "max_train_examples": 128, "pool": 1,
           "seed": 0, "lr": 1e-3, "weight_decay": 1e-4, "val_fraction": 0.1,
           "activation": "relu", "batch_norm": True, "head": "flatten"}
    rows = {body: run_cell(Cell.from_config(cfg).to_dict(),
                           TrialOptions(str(tmp_path / body), device="cpu", parallel_body=body))[0]
            for body in ("loop", "wide")}
    assert {b: r["parallel_body"] for b, r in rows.items()} == {"loop": "loop", "wide": "wide"}
    assert rows["loop"]["val_loss"] == pytest.approx(rows["wide"]["val_loss"], rel=1e-4)

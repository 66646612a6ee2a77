"""Fused training (issue 28): a group trains each member's cell as that cell trains alone.

One step of a group against each member's solo step, tensor by tensor, in fp32 on the CPU
(relative norm ||fused - solo|| / ||solo|| <= 1e-5), on real `digits` images; the group's
rows, divergence, failures, out-of-memory halving, checkpoints and resume; the packing of
cells into groups; `--fuse off` as the solo path; a fused run through Ray.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from study import schema
from study.models import build_for_cell
from study.options import TrialOptions
from study.store import Store
from study.train import autocast, run_cell
from study.fused.adamw import GroupedAdamW
from study.fused.net import GroupedNet
from study.fused.train import _halves, run_group
from sweep import Cell
from sweep.fusion import group_key, pack, parse_fuse

from procs import freeze_when

TOL_FP32 = 1e-5
# bf16: autocast rounds the forward's inputs and outputs to 8 bits of mantissa (2^-8 = 3.9e-3
# relative); grouped and solo kernels round at different places. Measured here (worst over
# layers 1 and 4, with and without batch norm, the mixed group): logits 6.9e-4, loss 1.8e-5,
# gradients 2.9e-2 (with batch norm: bf16 sums of small gradients), BatchNorm statistics
# 1.2e-5; a weight updated from a given gradient exactly (AdamW and weights stay FP32).
TOL_BF16 = {"logits": 1e-2, "loss": 1e-2, "grad": 5e-2, "weight": 1e-3}

BASE = dict(dataset="digits", architecture="sequential", layers=2, filters=4, kernel=3, pool=1,
            head="flatten", activation="relu", batch_norm=False, lr=3e-3, weight_decay=1e-4,
            batch_size=64, epochs=3, seed=0, max_train_examples=400, val_fraction=0.1,
            precision="fp32")


def cell(**kw) -> dict:
    return Cell.from_config({**BASE, **kw}).to_dict()


@pytest.fixture(scope="module")
def digits():
    from study import data

    d = data.load("digits", None, 0.1, None, "cpu")
    return d.train_x, d.train_y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if float(b.norm()) else float((a - b).norm())


def _one_step_errors(configs: list[dict], x, y, precision: str = "fp32", steps_before: int = 0
                     ) -> dict[str, float]:
    """The worst relative error per kind (logits, loss, grad, weight, buffer) of one fused
    step against each member's solo step from the same state (the solo optimizer updating
    with the fused gradient, see below). `steps_before` fused steps
    run first; their state is then written into the solo modules and optimizers, so the
    compared step starts from one state with AdamW moments and BatchNorm statistics."""
    solos = []
    for c in configs:
        torch.manual_seed(c["seed"])
        solos.append(build_for_cell(c, 1, 10, (8, 8))[0])
    net = GroupedNet([copy.deepcopy(m) for m in solos], [c["architecture"] for c in configs],
                     [c["activation"] for c in configs])
    opt = GroupedAdamW(net.parameters(), [c["lr"] for c in configs],
                       [c["weight_decay"] for c in configs])
    solo_opts = [torch.optim.AdamW(m.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
                 for m, c in zip(solos, configs)]
    k, gen = len(configs), torch.Generator().manual_seed(1)
    worst: dict[str, float] = {}
    for step in range(steps_before + 1):
        idx = torch.stack([torch.randperm(len(x), generator=gen)[:64] for _ in range(k)])
        if step == steps_before:  # the solo side starts from the group's state
            net.write_back(solos)
            for i, so in enumerate(solo_opts):
                so.load_state_dict(opt.member_state(i, copy.deepcopy(so)))
        with autocast(precision, x.device):
            logits = net.forward(x[idx])
            losses = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(),
                                     reduction="none").view(k, -1).mean(1)
        opt.zero_grad()
        losses.sum().backward()
        grads = {n: net.params[n].grad.clone() for n in net.param_names}
        opt.step()
        if step < steps_before:
            continue
        for i, (m, so) in enumerate(zip(solos, solo_opts)):
            m.train()
            with autocast(precision, x.device):
                solo_logits = m(x[idx[i]])
                loss = F.cross_entropy(solo_logits, y[idx[i]])
            so.zero_grad()
            loss.backward()
            errs = {"logits": _rel(logits[i], solo_logits), "loss": _rel(losses[i], loss)}
            for n, p in m.named_parameters():
                errs[f"grad {n}"] = _rel(grads[n][i], p.grad)
                # The solo AdamW steps on the fused gradient: Adam's first step is about
                # lr * sign(g), so a gradient entry of 1e-9 (a dead unit) whose sign rounding
                # flips moves a weight by 2 lr whichever side is right; the gradients are
                # checked above, the update of the same gradient here.
                p.grad.copy_(grads[n][i])
            so.step()
            for n, p in m.named_parameters():
                errs[f"weight {n}"] = _rel(net.params[n][i], p)
            for n, b in m.named_buffers():
                if b.dtype.is_floating_point:
                    errs[f"buffer {n}"] = _rel(net.buffers[n][i], b)
                else:  # num_batches_tracked: exactly the solo count
                    assert int(net.buffers[n][i]) == int(b), n
            for name, e in errs.items():
                kind = name.split()[0]
                worst[kind] = max(worst.get(kind, 0.0), e)
    return worst


ACTS = ("relu", "tanh", "gelu", "sigmoid")
MIXES = {
    # every architecture and activation at once, lr / weight decay / seed differing
    "mixed": [dict(architecture="sequential", activation="relu", seed=0, lr=3e-3, weight_decay=1e-4),
              dict(architecture="parallel", activation="tanh", seed=1, lr=1e-3, weight_decay=0.0),
              dict(architecture="plain", activation="gelu", seed=2, lr=5e-3, weight_decay=1e-2),
              dict(architecture="parallel", activation="sigmoid", seed=0, lr=3e-3, weight_decay=1e-4)],
    # one architecture, each activation, lr / weight decay / seed differing
    **{arch: [dict(architecture=arch, activation=act, seed=s, lr=lr, weight_decay=wd)
              for act, (s, lr, wd) in zip(ACTS, ((0, 3e-3, 1e-4), (1, 1e-3, 0.0), (2, 1e-2, 1e-2),
                                                 (0, 5e-3, 1e-4)))]
       for arch in ("sequential", "parallel", "plain")},
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_one_fused_step_equals_each_members_solo_step(digits, mix):
    """Logits, loss, every gradient, every updated weight and BatchNorm statistic of each
    member within 1e-5 of its solo step, at layers 1-4, with and without batch norm, from
    the initial state and from a state two steps in (AdamW moments, BN statistics)."""
    x, y = digits
    for layers, bn, before in itertools.product((1, 2, 3, 4), (False, True), (0, 2)):
        configs = [{**BASE, "filters": 8, "layers": layers, "batch_norm": bn, **m}
                   for m in MIXES[mix]]
        worst = _one_step_errors(configs, x, y, steps_before=before)
        assert max(worst.values()) <= TOL_FP32, (layers, bn, before, worst)


def test_one_fused_bf16_step_within_its_stated_tolerance(digits):
    x, y = digits
    for layers, bn in itertools.product((1, 4), (False, True)):
        configs = [{**BASE, "filters": 8, "layers": layers, "batch_norm": bn, **m}
                   for m in MIXES["mixed"]]
        worst = _one_step_errors(configs, x, y, precision="bf16")
        for kind, tol in TOL_BF16.items():
            assert worst[kind] <= tol, (layers, bn, kind, worst)


@pytest.mark.parametrize("bn", [False, True])
def test_grouped_evaluation_equals_each_members_solo_evaluation(digits, bn):
    """Each member's loss and accuracy from the grouped evaluation against train.evaluate of
    its solo module holding the same weights (after three steps, BatchNorm statistics
    moved): accuracies equal, losses within 1e-6 relative (measured: at most 3.5e-7)."""
    from study.fused.train import evaluate_members
    from study.train import evaluate

    x, y = digits
    configs = [{**BASE, "filters": 8, "layers": 3, "batch_norm": bn, **m}
               for m in MIXES["mixed"]]
    solos = []
    for c in configs:
        torch.manual_seed(c["seed"])
        solos.append(build_for_cell(c, 1, 10, (8, 8))[0])
    net = GroupedNet(solos, [c["architecture"] for c in configs],
                     [c["activation"] for c in configs])
    opt = GroupedAdamW(net.parameters(), [c["lr"] for c in configs],
                       [c["weight_decay"] for c in configs])
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        idx = torch.stack([torch.randperm(len(x), generator=gen)[:64] for _ in configs])
        opt.zero_grad()
        F.cross_entropy(net.forward(x[idx]).flatten(0, 1), y[idx].flatten()).backward()
        opt.step()
    net.write_back(solos)
    grouped = evaluate_members(net, x, y)
    for (g_loss, g_acc), m in zip(grouped, solos):
        s_loss, s_acc = evaluate(m, x, y)
        assert g_acc == s_acc
        assert abs(g_loss - s_loss) <= 1e-6 * abs(s_loss), (g_loss, s_loss)


def _rows(results) -> dict[str, tuple[dict, list[dict]]]:
    return {row["cell_id"]: (row, epochs) for row, epochs in results}


def test_a_cells_rows_do_not_depend_on_its_companions(tmp_path):
    """The same cell in a group of 2 and in a group of 5 (other architectures, activations,
    seeds and learning rates beside it): bit-identical losses, accuracies and epoch rows."""
    a = cell()
    groups = [[a, cell(architecture="parallel")],
              [cell(seed=5), a, cell(architecture="plain", activation="tanh"),
               cell(seed=7, lr=1e-2), cell(architecture="parallel")]]
    runs = [_rows(run_group(g, TrialOptions(results_dir=str(tmp_path / str(i)), study="s")))
            for i, g in enumerate(groups)]
    (r1, e1), (r2, e2) = runs[0][a["cell_id"]], runs[1][a["cell_id"]]
    assert r1["group_size"] == 2 and r2["group_size"] == 5
    assert r1["fused_group"] != r2["fused_group"]
    for k in ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc"):
        assert r1[k] == r2[k], k
    strip = lambda es: [{k: v for k, v in e.items() if k not in ("wall_s", "train_s")}  # noqa: E731
                        for e in es]
    assert strip(e1) == strip(e2)


def test_fused_cells_train_like_solo_cells_and_land_schema_clean_rows(tmp_path):
    """A group's rows: each member's own cell_id and pair_key, one fused_group and the group
    size, the group's time, losses close to the solo run's (float order differs), and
    every column in the schema."""
    cells = [cell(architecture=a, seed=s) for s in (0, 1) for a in ("sequential", "parallel")]
    fused = _rows(run_group(cells, TrialOptions(results_dir=str(tmp_path / "f"), study="s")))
    solo = _rows([run_cell(c, TrialOptions(results_dir=str(tmp_path / "s"), study="s"))
                  for c in cells])
    assert len({r["fused_group"] for r, _ in fused.values()}) == 1
    for c in cells:
        row, epochs = fused[c["cell_id"]]
        assert row["pair_key"] == c["pair_key"] and row["status"] == "ok"
        assert row["group_size"] == 4 and row["attempts"] == 1
        assert len(epochs) == 3 and [e["epoch"] for e in epochs] == [1, 2, 3]
        srow = solo[c["cell_id"]][0]
        assert srow["group_size"] == 1 and srow["fused_group"] is None
        assert abs(math.log(row["val_loss"] / srow["val_loss"])) < 1e-3
        assert row["n_params"] == srow["n_params"]
    assert len({r["wall_s"] for r, _ in fused.values()}) == 1  # one clock for the group
    schema.conform([r for r, _ in fused.values()], schema.TRIALS)
    schema.conform([e for _, es in fused.values() for e in es], schema.EPOCHS)


def test_a_diverging_member_is_frozen_while_the_others_finish(tmp_path):
    """A member whose loss overflows gets its diverged row at the epoch its solo run does;
    the others' rows are those of a group without it."""
    bad = cell(lr=1e5, layers=4, filters=8, seed=3)
    good = [cell(layers=4, filters=8), cell(layers=4, filters=8, architecture="parallel")]
    opts = lambda d: TrialOptions(results_dir=str(tmp_path / d), study="s")  # noqa: E731
    with_bad = _rows(run_group(good + [bad], opts("a")))
    without = _rows(run_group(good, opts("b")))
    solo_bad = run_cell(bad, opts("c"))[0]
    row = with_bad[bad["cell_id"]][0]
    assert solo_bad["status"] == "diverged"
    assert row["status"] == "diverged" and row["error"] == solo_bad["error"]
    assert row["epochs_done"] == solo_bad["epochs_done"]
    for c in good:
        r, _ = with_bad[c["cell_id"]]
        assert r["status"] == "ok" and r["val_loss"] == without[c["cell_id"]][0]["val_loss"]


def test_a_failing_group_is_retried_once_then_its_members_run_solo(tmp_path):
    """Both group attempts fail at epoch 2 (the fault hook raises in attempts 1 and 2); each
    member then runs solo, attempt 3, resuming from the checkpoint the group wrote for it
    after epoch 1 (solo format), and ends near its uninterrupted solo run."""
    cells = [cell(seed=s) for s in (0, 1)] + [cell(seed=1, architecture="parallel")]
    opts = TrialOptions(results_dir=str(tmp_path / "g"), study="s", inject_fault="seed=1@2x2",
                        checkpoint_every_s=0)
    rows = _rows(run_group(cells, opts))
    for c in cells:
        row, epochs = rows[c["cell_id"]]
        assert row["status"] == "ok" and row["group_size"] == 1 and row["fused_group"] is None
        assert row["attempts"] == 3 and [e["epoch"] for e in epochs] == [1, 2, 3]
        assert row["resumed_from_epoch"] == 1
        alone, _ = run_cell(c, TrialOptions(results_dir=str(tmp_path / "s"), study="s"))
        assert abs(math.log(row["val_loss"] / alone["val_loss"])) < 1e-3


def test_an_out_of_memory_group_is_halved_down_to_solo_cells(tmp_path):
    """Four cells; the one with seed 3 raises CUDA's out-of-memory error on its first attempt
    whatever group it is in: [0 1 2 3] -> [0 1] trains as a group, [2 3] -> [2], [3] solo
    (its solo retry passes)."""
    cells = [cell(seed=s) for s in range(4)]
    opts = TrialOptions(results_dir=str(tmp_path), study="s", inject_fault="oom:seed=3@1x1")
    rows = _rows(run_group(cells, opts))
    sizes = {c["config"]["seed"]: rows[c["cell_id"]][0]["group_size"] for c in cells}
    assert sizes == {0: 2, 1: 2, 2: 1, 3: 1}
    assert all(r["status"] == "ok" for r, _ in rows.values())
    assert rows[cells[3]["cell_id"]][0]["attempts"] == 2


def test_halving_keeps_twin_units_whole():
    cells = [cell(seed=s, architecture=a) for s in range(3) for a in ("sequential", "parallel")]
    first, rest = _halves(cells)
    assert {c["pair_key"] for c in first}.isdisjoint({c["pair_key"] for c in rest})
    assert len(first) + len(rest) == 6
    assert _halves(cells[:2]) == [[cells[0]], [cells[1]]]  # one unit: solo, the last resort


def test_pack_groups_by_key_keeps_twins_together_and_leaves_other_families_solo():
    cells = [Cell.from_config({**BASE, "architecture": a, "seed": s, "layers": layers})
             for layers in (2, 3) for s in range(3) for a in ("sequential", "parallel", "plain")]
    cells += [Cell.from_config({**BASE, "architecture": "highway", "seed": 0})]
    groups = pack(cells, 6)
    for g in groups:
        assert len({group_key(c.config) for c in g}) == 1
        assert len(g) <= 6
    by_pair = {}
    for i, g in enumerate(groups):
        for c in g:
            if c["architecture"] != "highway":  # its twins fuse; it stays solo
                by_pair.setdefault(c.pair_key, set()).add(i)
    assert all(len(v) == 1 for v in by_pair.values())  # twins never split
    assert [len(g) for g in groups] == [6, 3, 6, 3, 1]
    assert pack(cells, 1) == [[c] for c in cells]
    assert group_key({**BASE, "architecture": "highway"}) is None
    # members may differ in seed, lr, weight decay, architecture and activation, not in shape
    assert group_key({**BASE, "lr": 1.0, "activation": "tanh"}) == group_key(BASE)
    assert group_key({**BASE, "filters": 8}) != group_key(BASE)
    # a unit larger than K is a group of its own
    assert [len(g) for g in pack(cells[:3], 2)] == [3]


def test_parse_fuse_takes_off_auto_and_k():
    assert parse_fuse("off") == "off" and parse_fuse("AUTO") == "auto" and parse_fuse("8") == 8
    for bad in ("0", "-2", "many", "1000"):
        with pytest.raises(ValueError, match="--fuse"):
            parse_fuse(bad)


FUSE_SPEC = """
[study]
name = "fz"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = [2, 3]
filters = 4
kernel = 3
pool = 1
epochs = EPOCHS
batch_size = 32
lr = 3e-3
seed = [0, 1]
max_train_examples = 600
"""


def _spec(tmp_path, epochs: int):
    from sweep import load_spec

    p = tmp_path / "fz.toml"
    p.write_text(FUSE_SPEC.replace("EPOCHS", str(epochs)))
    return p, load_spec(p)


def test_fuse_off_rows_equal_the_solo_trial_functions_and_the_mode_is_recorded(tmp_path):
    from study.runner import RunOptions, run_study

    spec_path, spec = _spec(tmp_path, 2)
    out = tmp_path / "off"
    run_study(spec, RunOptions(TrialOptions(str(out)), executor="local", quiet=True, fuse="off"))
    assert (out / "fuse.txt").read_text().strip() == "off"
    df = Store(out).read_trials().set_index("cell_id")
    assert (df["group_size"] == 1).all() and df["fused_group"].isna().all()
    for c in spec.cells():
        row, _ = run_cell(c.to_dict(), TrialOptions(str(tmp_path / "solo"), study=spec.name))
        for k in ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "n_params"):
            assert df.loc[c.cell_id, k] == row[k], k


def test_fused_run_through_ray_lands_every_cell_with_its_group(ray_session, tmp_path):
    """--fuse 2 under the Ray executor: one trial per group, every row landed with its
    group, the same numbers as the same groups trained by the local executor, and a status
    that counts a group's time once."""
    from study.runner import RunOptions, run_study, status

    spec_path, spec = _spec(tmp_path, 2)
    out, local = tmp_path / "ray", tmp_path / "local"
    summary = run_study(spec, RunOptions(TrialOptions(str(out)), executor="ray", quiet=True, fuse=2))
    assert summary.ran == 8 and summary.ok == 8
    run_study(spec, RunOptions(TrialOptions(str(local)), executor="local", quiet=True, fuse=2))
    a = Store(out).read_trials().set_index("cell_id").sort_index()
    b = Store(local).read_trials().set_index("cell_id").sort_index()
    assert (a["group_size"] == 2).all() and a["fused_group"].nunique() == 4
    assert (a.groupby("fused_group")["pair_key"].nunique() == 1).all()  # twins together
    assert (a["fused_group"] == b["fused_group"]).all()
    assert (a["val_loss"] == b["val_loss"]).all()
    for part in (out / "trials").glob("*.parquet"):
        assert pq.read_schema(part).equals(schema.TRIALS)
    st = status(Store(out))
    assert st["training"] == {"solo": 0, "fused": 8}
    assert st["compute_s"] == pytest.approx(a.groupby("fused_group")["wall_s"].max().sum())


def test_the_time_statistic_counts_solo_pairs_only(tmp_path):
    """Two stores of the same cells, one trained solo and one fused: the training-time rows
    of the analysis come from the solo cells, and a store with both modes says so."""
    from analysis.compute import analyse
    from study.runner import RunOptions, run_study

    spec_path, spec = _spec(tmp_path, 2)
    solo, mixed = tmp_path / "solo", tmp_path / "mixed"
    run_study(spec, RunOptions(TrialOptions(str(solo)), executor="local", quiet=True, fuse="off"))
    run_study(spec, RunOptions(TrialOptions(str(mixed)), executor="local", quiet=True, fuse=2))
    t_solo = analyse(solo).stats
    t_solo = t_solo[t_solo["metric"] == "train_s_per_epoch"]
    assert len(t_solo) and (t_solo["n"] > 0).all()
    t_fused = analyse(mixed).stats
    assert not (t_fused["metric"] == "train_s_per_epoch").any()  # no solo pair: no time row
    from analysis.report import _modes_text
    from study.trials import trained_cells
    both = pd.concat([Store(solo).read_trials().iloc[:3], Store(mixed).read_trials().iloc[3:]])
    assert "mixed modes" in _modes_text(trained_cells(both))


@pytest.mark.slow
def test_driver_killed_mid_group_resumes_each_cell_from_its_own_checkpoint(tmp_path):
    """SIGKILL of the driver while groups train (checkpoints every epoch), then `study
    resume`: every cell once, each cell in flight resumed from its own (solo-format)
    checkpoint, grouped again with the cells at its epoch."""
    from procs import kill_tree
    from conftest import checkpointed_in_flight, run_cli

    spec_path, spec = _spec(tmp_path, 40)
    out = tmp_path / "res"
    env = {**os.environ, "STUDY_CHECKPOINT_EVERY_S": "0"}
    driver = subprocess.Popen([sys.executable, "-m", "study.cli", "run", str(spec_path),
                               "--results", str(out), "--executor", "local", "--fuse", "4",
                               "--no-figures"], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = Store(out)
    try:
        def landed_and_in_flight():
            rows, flying = store.part_ids(store.trials_dir), checkpointed_in_flight(store)
            return (rows, flying) if rows and len(flying) >= 2 else None
        freeze_when(driver, landed_and_in_flight, 240, "a landed group and a group in flight")
        kill_tree(driver.pid)
        driver.wait(timeout=30)
    finally:
        kill_tree(driver.pid)
    before = set(store.read_trials()["cell_id"])
    checkpointed = set(checkpointed_in_flight(store)) - before
    assert len(checkpointed) >= 2 and len(before) < 8
    r = run_cli("resume", out, "--no-figures")  # keeps --fuse 4, recorded in the folder
    assert r.returncode == 0, r.stderr
    assert "fused groups (--fuse 4)" in r.stderr
    df = store.read_trials().set_index("cell_id")
    assert sorted(df.index) == sorted(c.cell_id for c in spec.cells())
    assert (df["status"] == "ok").all() and (df["epochs_done"] == 40).all()
    resumed = df.loc[sorted(checkpointed)]
    assert (resumed["resumed_from_epoch"] > 0).all() and (resumed["group_size"] > 1).all()
    ep = store.read_epochs()
    assert len(ep) == 40 * 8 and not ep.duplicated(["cell_id", "epoch"]).any()
    assert not list(store.checkpoints_dir.glob("*.pt"))


def test_fuse_auto_is_solo_on_cpus_and_sized_by_activation_memory_on_gpus():
    from study import executor_registry
    from study.runner import RunOptions, fuse_size
    from sweep.fusion import AUTO_MAX_K, activation_bytes, auto_k

    ray, local = executor_registry.get("ray"), executor_registry.get("local")
    trial = TrialOptions("x")
    assert fuse_size(RunOptions(trial, fuse="auto"), local) == 1  # no CUDA here
    assert fuse_size(RunOptions(trial, fuse="auto", gpus_per_trial=0), ray) == 1
    assert fuse_size(RunOptions(trial, fuse="off", gpus_per_trial=1), ray) == 1
    assert fuse_size(RunOptions(trial, fuse=8), local) == 8
    size = fuse_size(RunOptions(trial, fuse="auto", gpus_per_trial=1), ray)
    small = {**BASE, "dataset": "mnist", "filters": 8, "pool": 4, "layers": 2, "batch_size": 256}
    big = {**small, "filters": 64, "pool": 1, "layers": 8}
    assert size(small) == AUTO_MAX_K and 1 <= size(big) < AUTO_MAX_K
    assert activation_bytes(big) > activation_bytes(small)
    assert auto_k(big, 0.25) <= auto_k(big, 1.0)

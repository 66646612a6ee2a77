"""Training a fused group: K cells of one group key (sweep.fusion) in one grouped step.

Each member trains its own cell as it would alone (study.train): its initial weights are the
ones its cell gets when built alone under its seed (each is built, then stacked), it sees its
seed's batches in its seed's order, it has its own AdamW state, learning rate and weight
decay, and its own BatchNorm statistics. Evaluation runs grouped too (eval mode, FP32, each
member's loss summed as train.evaluate sums a solo cell's); checkpoints and final weights go
through each member's solo module (written back from the stack), so they are solo-format and
a checkpointed cell resumes alone or in any group. A member whose loss stops being finite is
frozen and gets its `diverged` row at that epoch; the others go on.

`run_group` is the trial function of a group: one retry as a group, then each member solo
under the solo retry rules (train.run_cell); an out-of-memory error halves the group instead.
"""
from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from sweep.fusion import group_id

from .. import data as datasets
from .. import interrupt
from ..models import build_for_cell, n_params
from ..options import TrialOptions
from ..rows import cell_row, now
from ..store import Store
from ..train import (CellFiles, _fault_matches, _pick_device, inject_fault,
                     autocast, checkpoint, device_name, finish, hold_epoch, nudge_ulps,
                     restore, run_cell, set_precision)
from .adamw import GroupedAdamW
from .net import GroupedNet


@dataclass
class Member:
    """One cell of a group: its solo module and optimizer (the solo format of its state)."""
    cell: dict  # sweep.Cell.to_dict()
    model: torch.nn.Module
    opt: torch.optim.AdamW
    filters_used: int
    rng: torch.Tensor  # its CPU generator state after its build (what a solo checkpoint holds)
    epochs: list[dict] = field(default_factory=list)
    start_epoch: int = 1
    wall_s: float = 0.0
    diverged: str | None = None

    @property
    def config(self) -> dict:
        return self.cell["config"]

    @property
    def cell_id(self) -> str:
        return self.cell["cell_id"]


def _members(cells: list[dict], data: "datasets.Data", device: torch.device,
             init_ulps: int = 0) -> list[Member]:
    """Each cell built alone under its seed, exactly as train._setup builds it."""
    out = []
    for cell in cells:
        config = cell["config"]
        torch.manual_seed(config["seed"])
        model, filters_used = build_for_cell(config, data.in_channels, data.n_classes,
                                             tuple(data.train_x.shape[-2:]))
        if init_ulps:
            nudge_ulps(model, init_ulps)
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=config["lr"],
                                weight_decay=config["weight_decay"])
        out.append(Member(cell, model, opt, filters_used, torch.get_rng_state()))
    return out


def _restore(members: list[Member], files: CellFiles, device: torch.device) -> None:
    for m in members:
        m.epochs, m.start_epoch, m.wall_s = restore(files, m.cell_id, m.model, m.opt, device)
        if m.start_epoch > 1:
            m.rng = torch.get_rng_state()  # restore() set the checkpoint's


def epoch_steps(net: GroupedNet, opt: GroupedAdamW, x: torch.Tensor, y: torch.Tensor,
                perms: torch.Tensor, batch_size: int, precision: str, active: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The optimizer steps of one epoch, member k over x[perms[k]]; returns (summed loss,
    correct count, still active), each (K,) on the device. On a CPU each batch's losses are
    checked at once (as train.train_steps does); on a GPU the check stays on the device, so a
    step never waits for the host, and a member's update is masked from the batch its loss
    stopped being finite."""
    k = perms.shape[0]
    loss_sum = torch.zeros(k, device=x.device)
    correct = torch.zeros(k, device=x.device, dtype=torch.long)
    on_cpu = x.device.type == "cpu"
    all_on = bool(active.all()) if on_cpu else False
    for i in range(0, perms.shape[1], batch_size):
        idx = perms[:, i:i + batch_size]
        xb, yb = x[idx], y[idx]
        with autocast(precision, x.device):
            logits = net.forward(xb, training=True, active=None if all_on else active)
            losses = F.cross_entropy(logits.flatten(0, 1), yb.flatten(),
                                     reduction="none").view(k, -1).mean(1)
        # A member whose loss is not finite is frozen from this batch on: its update is
        # masked out (its BatchNorm statistics took this batch, as a solo cell's forward
        # does before train.train_steps stops it).
        finite = torch.isfinite(losses.detach())
        if on_cpu:
            if not bool(finite.all()):
                all_on = False
                active = active & finite
                if not bool(active.any()):
                    break
        else:
            active = active & finite
        opt.zero_grad(set_to_none=True)
        torch.where(active, losses, torch.zeros_like(losses)).sum().backward()
        opt.step(None if all_on else active)
        live = losses.detach().float() * idx.shape[1]
        loss_sum += live if all_on else torch.where(active, live, torch.zeros_like(live))
        correct += (logits.argmax(2) == yb).sum(1)
    return loss_sum, correct, active


# Images per member in a grouped evaluation batch. Fixed per member, not per group: a
# member's loss is summed batch by batch, so a batch that depended on K would make a cell's
# values depend on its companions.
MEMBER_EVAL_BATCH = {"cpu": 64, "cuda": 512}


@torch.no_grad()
def evaluate_members(net: GroupedNet, x: torch.Tensor, y: torch.Tensor
                     ) -> list[tuple[float, float]]:
    """Each member's (mean cross-entropy, accuracy) over a whole split, as train.evaluate
    gives them for its solo module, from one grouped forward per batch of MEMBER_EVAL_BATCH
    images per member. Measured (the demo's digits cells, layers 4, filters 8, K = 8, one
    thread, with and without batch norm, 64 images per member): 76-82 ms for the 1,294
    training images against 126-134 ms for the 8 solo evaluations, 10-11 ms against 17-18
    ms for the 144 validation images. At 256 images per member (the solo batch) the grouped
    evaluation took longer than the solo ones (its 4 MB activations leave the cache); at 32,
    about 10% more than at 64. The losses differ from the solo evaluation of the same
    weights by at most 3.5e-7 relative (grouped convolutions round differently), the
    accuracies not at all."""
    k = net.k
    if len(x) == 0:
        return [(math.nan, math.nan)] * k
    loss_sum = torch.zeros(k, device=x.device)
    correct = torch.zeros(k, device=x.device, dtype=torch.long)
    bs = MEMBER_EVAL_BATCH.get(x.device.type, 512)
    for i in range(0, len(x), bs):
        xb, yb = x[i:i + bs], y[i:i + bs]
        logits = net.forward(xb.expand(k, *xb.shape), training=False)
        # each member's loss summed by the solo reduction (batches of its share, not 256)
        loss_sum += torch.stack([F.cross_entropy(lk, yb, reduction="sum") for lk in logits])
        correct += (logits.argmax(2) == yb).sum(1)
    n = len(x)
    return [(s / n, c / n) for s, c in zip(loss_sum.tolist(), correct.tolist())]


def _check_faults(members: list[Member], opts: TrialOptions, epoch: int, attempt: int) -> None:
    for m in members:
        if _fault_matches(opts.inject_fault, m.config, epoch, attempt):
            inject_fault(opts, f"injected fault at epoch {epoch} (attempt {attempt}) "
                         f"in a fused group of {len(members)}")


def _permutations(members: list[Member], n: int, epoch: int, device: torch.device
                  ) -> torch.Tensor:
    """Each member's batch order of `epoch`: its seed's permutation, as train.train_epoch
    draws it."""
    return torch.stack([
        torch.randperm(n, generator=torch.Generator().manual_seed(
            m.config["seed"] * 100_003 + epoch)) for m in members]).to(device)


def _checkpoint(members: list[Member], live: list[int], opt: GroupedAdamW, net: GroupedNet,
                files: CellFiles, epoch: int, device: torch.device) -> None:
    """Each live member's own checkpoint, in the solo format."""
    net.write_back([m.model for m in members], live)
    for k in live:
        m = members[k]
        opt.member_state(k, m.opt)
        checkpoint(files, m.cell_id, epoch, m.model, m.opt, m.epochs, m.wall_s, device, m.rng)


def _record_epoch(members: list[Member], live: list[int], epoch: int,
                  train: list[tuple[float, float]], scores: list[tuple[float, float]],
                  epoch_s: float, train_s: float, active: torch.Tensor) -> list[int]:
    """Each live member's epoch row (its training and validation loss and accuracy, the
    group's times), or its divergence on a non-finite validation loss (frozen from then);
    returns the members still live."""
    for k in live:
        m, (val_loss, val_acc) = members[k], scores[k]
        if not math.isfinite(val_loss):
            m.diverged = f"non-finite validation loss at epoch {epoch}"
            active[k] = False
            continue
        m.wall_s += epoch_s  # the group's time: members share every second of it
        m.epochs.append({"cell_id": m.cell_id, "epoch": epoch, "train_loss": train[k][0],
                         "val_loss": val_loss, "train_acc": train[k][1],
                         "val_acc": val_acc, "wall_s": m.wall_s, "train_s": train_s})
    return [k for k in live if members[k].diverged is None]


WIRING_ORDER = {"parallel": 0, "sequential": 1, "plain": 2}


def train_members(members: list[Member], data: "datasets.Data", opts: TrialOptions,
                  attempt: int, report: Callable[[dict], None] | None, files: CellFiles,
                  device: torch.device) -> tuple[GroupedNet, list[Member]]:
    """Members that start at the same epoch, trained as one group to the end (or each to
    its divergence); their epoch rows and states end up in `members`. Returns the grouped
    net and its members in its order (for the final evaluation)."""
    # Members of one wiring side by side: GroupedNet keeps a channel block per run of one
    # wiring (so at most three here) and concatenates them, where members in the cells'
    # order (sequential, parallel, ...) would make a block of each. The order is internal:
    # member k is members[k] in the net, the optimizer and every write-back below, and each
    # member's rows and state land in its own Member.
    members = sorted(members, key=lambda m: WIRING_ORDER[m.config["architecture"]])
    c0 = members[0].config
    precision = c0.get("precision", "fp32")
    net = GroupedNet([m.model for m in members], [m.config["architecture"] for m in members],
                     [m.config.get("activation", "relu") for m in members])
    opt = GroupedAdamW(net.parameters(), [m.config["lr"] for m in members],
                       [m.config["weight_decay"] for m in members])
    for k, m in enumerate(members):
        opt.load_member(k, m.opt)
    active = torch.ones(len(members), dtype=torch.bool, device=device)
    n, last_saved = len(data.train_x), time.perf_counter()
    if interrupt.should_stop():  # asked to stop before it began: nothing to save
        raise interrupt.CellInterrupted(members[0].cell_id)
    for epoch in range(members[0].start_epoch, c0["epochs"] + 1):
        _check_faults(members, opts, epoch, attempt)
        hold_epoch(opts)
        t0 = time.perf_counter()
        perms = _permutations(members, n, epoch, device)
        loss_sum, correct, active = epoch_steps(net, opt, data.train_x, data.train_y, perms,
                                                c0["batch_size"], precision, active)
        losses, corrects, on = loss_sum.tolist(), correct.tolist(), active.tolist()
        train_s = time.perf_counter() - t0  # .tolist() waited for the GPU
        live = [k for k, m in enumerate(members) if m.diverged is None]
        for k in live:
            if not (on[k] and math.isfinite(losses[k])):
                members[k].diverged = f"non-finite training loss at epoch {epoch}"
        live = [k for k in live if members[k].diverged is None]
        scores = evaluate_members(net, data.val_x, data.val_y)
        train = [(losses[k] / n, corrects[k] / n) for k in range(len(members))]
        live = _record_epoch(members, live, epoch, train, scores,
                             time.perf_counter() - t0, train_s, active)
        if not live:
            break
        stop = epoch < c0["epochs"] and interrupt.should_stop()
        if stop or (epoch < c0["epochs"]
                    and time.perf_counter() - last_saved >= opts.checkpoint_every_s):
            _checkpoint(members, live, opt, net, files, epoch, device)
            last_saved = time.perf_counter()
        if stop:  # each live member's epoch is saved as its own checkpoint
            raise interrupt.CellInterrupted(members[0].cell_id)
        if report is not None:
            report({"epoch": epoch})
    net.write_back([m.model for m in members],
                   [k for k, m in enumerate(members) if m.diverged is None])
    return net, members


def _setup(cells: list[dict], opts: TrialOptions, raw: "datasets.Raw | None"):
    device = _pick_device(opts.device)
    torch.set_num_threads(max(1, int(opts.threads)))
    c0 = cells[0]["config"]
    set_precision(c0.get("precision", "fp32"), opts.cudnn_benchmark)
    data = datasets.load(c0["dataset"], opts.data_dir, c0["val_fraction"],
                         c0.get("max_train_examples"), device, opts.download, raw=raw)
    return device, data


def train_group(cells: list[dict], opts: TrialOptions, attempt: int = 1,
                report: Callable[[dict], None] | None = None, files: CellFiles | None = None,
                raw: "datasets.Raw | None" = None) -> list[tuple[dict, list[dict]]]:
    """Train the cells of one group to the end; returns each one's (result fields, epoch
    rows), in order. Members resumed from checkpoints train with the members at their
    epoch only. Raises on errors; `run_group` turns them into retries."""
    device, data = _setup(cells, opts, raw)
    files = files if files is not None else Store(opts.results_dir)
    members = _members(cells, data, device, opts.init_ulps)
    _restore(members, files, device)
    by_epoch: dict[int, list[Member]] = {}
    for m in members:
        by_epoch.setdefault(m.start_epoch, []).append(m)
    trained = [train_members(sub, data, opts, attempt, report, files, device)
               for sub in by_epoch.values()]
    t0 = time.perf_counter()
    results = []
    for net, sub in trained:
        gid = group_id(m.cell_id for m in sub) if len(sub) > 1 else None
        splits = {split: evaluate_members(net, x, y) for split, (x, y) in data.splits().items()}
        for k, m in enumerate(sub):
            result = {
                "n_params": n_params(m.model), "filters_used": m.filters_used,
                "n_train": len(data.train_x), "n_val": len(data.val_x),
                "n_test": len(data.test_x), "n_classes": data.n_classes,
                "epochs_done": len(m.epochs), "wall_s": m.wall_s, "device": str(device),
                "device_name": device_name(device),
                "parallel_body": "fused" if m.config["architecture"] == "parallel" else None,
                "resumed_from_epoch": m.start_epoch - 1, "pruned_branches": None,
                "fused_group": gid, "group_size": len(sub)}
            if m.diverged:
                results.append((m, {**result, "status": "diverged", "error": m.diverged}))
            else:
                scores = {split: per_member[k] for split, per_member in splits.items()}
                results.append((m, finish(m.model, data, result, files, m.cell_id, m.config,
                                          m.filters_used, opts.save_weights, scores)))
    # The final evaluations count once for the group, like every other second of it.
    final_s = time.perf_counter() - t0
    for m, result in results:
        result["wall_s"] = m.wall_s + final_s
    order = {c["cell_id"]: i for i, c in enumerate(cells)}
    results.sort(key=lambda t: order[t[0].cell_id])
    return [(result, m.epochs) for m, result in results]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _halves(cells: list[dict]) -> list[list[dict]]:
    """Two groups of about half the cells each, twin units (one pair_key) kept whole."""
    units: dict[str, list[dict]] = {}
    for c in cells:
        units.setdefault(c["pair_key"], []).append(c)
    first: list[dict] = []
    for unit in units.values():
        if first and len(first) + len(unit) > len(cells) // 2:
            break
        first += unit
    rest = [c for c in cells if c not in first]
    if not rest:  # one twin unit: out of memory even so, its cells go on solo
        return [[c] for c in cells]
    return [first, rest]


GROUP_ATTEMPTS = 2  # a group's error is retried once as a group, then its members run solo


def run_group(cells: list[dict], opts: TrialOptions,
              report: Callable[[dict], None] | None = None, node_id: str = "",
              files: CellFiles | None = None, raw: "datasets.Raw | None" = None
              ) -> list[tuple[dict, list[dict]]]:
    """The trial function of a fused group: every member's finished row and epoch rows.

    Never raises for the cells' own errors. An error is retried once as a group; after
    that each member runs solo (train.run_cell, with its retries, counting the group's
    attempts). An out-of-memory error halves the group instead (down to solo cells). On a
    stop request (study.interrupt) it returns the rows finished so far; the other members
    wrote their checkpoints and stay pending.
    """
    done: list[tuple[dict, list[dict]]] = []  # rows finished before a stop request
    try:
        _run_group(cells, opts, report, node_id, files, raw, done)
    except interrupt.CellInterrupted:
        pass  # the unfinished cells checkpointed and stay pending: no row
    return done


def _run_group(cells: list[dict], opts: TrialOptions, report, node_id: str,
               files: CellFiles | None, raw, done: list) -> None:
    """run_group's work, each finished row appended to `done` as it finishes."""
    if len(cells) == 1:
        done.append(run_cell(cells[0], opts, report, node_id, files, raw))
        return
    files = files if files is not None else Store(opts.results_dir)
    started = now()
    attempt = 0
    while attempt < GROUP_ATTEMPTS:
        attempt += 1
        try:
            results = train_group(cells, opts, attempt, report, files, raw)
        except interrupt.CellInterrupted:
            raise
        except datasets.DatasetError:
            break  # deterministic: each member records it solo
        except Exception as e:  # noqa: BLE001 - the cells' own errors
            if _is_oom(e):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for half in _halves(cells):
                    _run_group(half, opts, report, node_id, files, raw, done)
                return
            continue
        host, device = socket.gethostname(), str(_pick_device(opts.device))
        done.extend((cell_row(c, result, study=opts.study, attempts=attempt, started_at=started,
                              host=host, node_id=node_id, device=device), epochs)
                    for c, (result, epochs) in zip(cells, results))
        return
    for c in cells:
        done.append(run_cell(c, opts, report, node_id, files, raw, attempts_before=attempt,
                             started=started))

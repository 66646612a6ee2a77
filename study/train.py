"""Training one cell: the trial function that both executors (Ray Tune and local) run.

A flat loop (nanoGPT/airbench style): the whole dataset lives as tensors on the device, each
epoch draws a permutation from a generator seeded by (seed, epoch), so a deep/shallow pair with
the same seed starts from identical weights and sees identical batches, and a cell resumed from
a checkpoint sees exactly the batches it would have seen.

`train_cell` reads top to bottom: set up, `restore`, one `train_epoch` per epoch (with the
divergence checks, the epoch row, a `checkpoint` now and then), `finish`. `run_cell` wraps it
with retries and builds the row (study.rows).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import math
import os
import platform
import socket
import time
import traceback
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from . import data as datasets
from . import interrupt
from .models import build_for_cell, n_params
from .options import TrialOptions
from .rows import cell_row, failed_result, now
from .store import Store


class CellFiles(Protocol):
    """Where a cell's checkpoints and final weights go, as bytes. `Store` writes them into
    the results folder itself (the local executor, on the driver's machine); under Ray a small
    actor on the driver's node does (executors.ray_files.DriverFiles), so no worker needs the folder."""
    def save_checkpoint(self, cell_id: str, data: bytes) -> bool: ...
    def load_checkpoint(self, cell_id: str, mark_in_flight: bool = False) -> bytes | None: ...
    def save_weights(self, cell_id: str, data: bytes) -> str | None: ...
    def quarantine_checkpoint(self, cell_id: str, reason: str, mark_in_flight: bool = False) -> None: ...

# Evaluation batch: on a CPU large batches fall out of cache (2048 measured 2x slower than
# 256 on MNIST-sized inputs); a GPU wants them large.
EVAL_BATCH = {"cpu": 256, "cuda": 4096}


class InjectedFault(RuntimeError):
    pass


def _pick_device(pref: str) -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def set_precision(precision: str, cudnn_benchmark: bool = False) -> None:
    """Set the process-wide arithmetic flags for one cell. Ray reuses actors, so every cell
    sets them all: a tf32 cell must not leave TF32 on for the fp32 cell after it. bf16 keeps
    TF32 off too: what autocast leaves in FP32 (and evaluation) stays true FP32."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def autocast(precision: str, device: torch.device):
    """The context of the training forward pass and loss: bf16 autocast, or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    """The GPU's model name, or the CPU's (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


OOM_FAULT = "oom:"  # an injected fault spec with this prefix raises CUDA's out-of-memory error
# ... with this one the worker process exits at once (a lost worker), the first time only:
# the file EXIT_FAULT_MARK in the results folder records that it did (tests on one machine)
EXIT_FAULT, EXIT_FAULT_MARK = "exit:", ".injected-exit"


def injected_fault(spec: str, what: str) -> Exception:
    """The error a matching test hook raises: InjectedFault, or with "oom:" the error type
    torch raises when the GPU's memory runs out (a fused group halves itself on it)."""
    if spec.startswith(OOM_FAULT):
        return torch.OutOfMemoryError(f"CUDA out of memory (injected): {what}")
    return InjectedFault(what)


def inject_fault(opts: TrialOptions, what: str) -> None:
    """What a matching test hook does: raise injected_fault's error, or with "exit:" end the
    process the first time (a worker lost) and do nothing after."""
    if not opts.inject_fault.startswith(EXIT_FAULT):
        raise injected_fault(opts.inject_fault, what)
    try:
        (Path(opts.results_dir) / EXIT_FAULT_MARK).open("x").close()
    except FileExistsError:
        return
    os._exit(17)


EPOCH_HOLD_S = 0.25


def hold_epoch(opts: TrialOptions) -> None:
    """The epoch_hold test hook: a pause before the epoch while its file exists."""
    if opts.epoch_hold and os.path.exists(opts.epoch_hold):
        time.sleep(EPOCH_HOLD_S)


def _fault_matches(spec: str | None, config: dict, epoch: int, attempt: int) -> bool:
    if not spec:
        return False
    if spec.startswith(EXIT_FAULT):  # once only (inject_fault), whatever the attempt
        spec, attempt = spec.removeprefix(EXIT_FAULT), 1
    cond, _, when = spec.removeprefix(OOM_FAULT).partition("@")
    ep, _, times = when.partition("x")
    for kv in filter(None, cond.split(",")):
        k, _, v = kv.partition("=")
        if str(config.get(k)).lower() != v.lower():
            return False
    return int(ep or 1) == epoch and (not times or attempt <= int(times))


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, order: list[int] | None = None
             ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split, in eval mode. `order`: the blocks
    to run, in that order (the lesion analysis drops or swaps them); None runs them all."""
    if len(x) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    bs = EVAL_BATCH.get(x.device.type, 1024)
    for i in range(0, len(x), bs):
        logits = model(x[i:i + bs], order)
        yb = y[i:i + bs]
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    loss_sum, correct = loss_sum.item(), correct.item()  # one device sync per split
    model.train(was_training)
    return loss_sum / len(x), correct / len(x)


def _to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _load_checkpoint(files: CellFiles, cell_id: str, mark_in_flight: bool = False) -> dict | None:
    """The cell's checkpoint state, or None to start afresh. weights_only: a checkpoint holds
    tensors and plain containers only, so a file whose pickle would run code is refused (and,
    like a torn or foreign one, quarantined with a note)."""
    data = files.load_checkpoint(cell_id, mark_in_flight)
    if not data:
        return None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:300]
        reason = f"checkpoint refused by torch.load(weights_only=True): {type(e).__name__}: {first}"
        files.quarantine_checkpoint(cell_id, reason, mark_in_flight)
        return None
    if not (isinstance(state, dict) and state.get("cell_id") == cell_id):
        files.quarantine_checkpoint(cell_id, "checkpoint is not this cell's", mark_in_flight)
        return None
    return state


def _setup(config: dict, opts: TrialOptions, raw: "datasets.Raw | None"):
    """(device, data, model, filters used, optimizer) of a cell, seeded: twins start alike."""
    device = _pick_device(opts.device)
    torch.set_num_threads(max(1, int(opts.threads)))
    set_precision(config.get("precision", "fp32"), opts.cudnn_benchmark)
    data = datasets.load(config["dataset"], opts.data_dir, config["val_fraction"],
                         config.get("max_train_examples"), device, opts.download, raw=raw)
    torch.manual_seed(config["seed"])  # same seed -> same initial weights for twins
    model, filters_used = build_for_cell(config, data.in_channels, data.n_classes,
                                         tuple(data.train_x.shape[-2:]))
    if hasattr(model, "parallel_body") and config["architecture"] == "parallel":
        model.parallel_body = opts.parallel_body
    if opts.init_ulps:
        nudge_ulps(model, opts.init_ulps)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    return device, data, model, filters_used, opt


@torch.no_grad()
def nudge_ulps(model, ulps: int) -> None:
    """Move every parameter `ulps` ulps toward +inf (negative: toward -inf), in place: the
    one-ulp perturbation of study.fused.drift (TrialOptions.init_ulps)."""
    for p in model.parameters():
        for _ in range(abs(ulps)):
            p.copy_(torch.nextafter(p, torch.full_like(p, math.inf if ulps > 0 else -math.inf)))


def restore(files: CellFiles, cell_id: str, model, opt, device: torch.device
            ) -> tuple[list[dict], int, float]:
    """Load the cell's checkpoint into model and optimizer, if there is one; returns (epoch
    rows so far, first epoch to train, training time so far)."""
    state = _load_checkpoint(files, cell_id, mark_in_flight=True)  # one round trip
    if state is None:
        return [], 1, 0.0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["epochs"], state["epoch"] + 1, state["wall_s"]


def checkpoint(files: CellFiles, cell_id: str, epoch: int, model, opt, epochs: list[dict],
               wall_s: float, device: torch.device, rng: torch.Tensor | None = None) -> None:
    """The cell's state after `epoch`, in the one format every resume reads (solo or fused).
    `rng`: the cell's CPU generator state (a fused group keeps one per member)."""
    files.save_checkpoint(cell_id, _to_bytes({
        "cell_id": cell_id, "epoch": epoch, "model": model.state_dict(),
        "optimizer": opt.state_dict(), "rng": torch.get_rng_state() if rng is None else rng,
        # mask sampling (learned_connectivity) draws from the CUDA generator on a GPU
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "epochs": epochs, "wall_s": wall_s}))


def train_epoch(model, opt, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                epoch: int, epochs: int, precision: str = "fp32") -> tuple[float, float]:
    """One pass over (x, y) in the order drawn from (seed, epoch); returns (mean training
    loss, running accuracy). The loss is NaN once a batch's loss is not finite. Under bf16
    the forward pass and loss run in autocast; weights, gradients and AdamW stay FP32."""
    if hasattr(model, "on_epoch_start"):
        model.on_epoch_start(epoch, epochs)
    model.train()
    n = len(x)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).to(x.device)
    loss_sum, correct, loss = train_steps(model, opt, x, y, perm, batch_size, precision)
    train_loss = loss_sum.item() / n  # one device sync per epoch, not per batch
    return (train_loss if math.isfinite(loss.item()) else math.nan), correct.item() / n


def train_steps(model, opt, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor,
                batch_size: int, precision: str = "fp32"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The optimizer steps of one epoch over x[perm]; returns (summed loss, correct count,
    last batch's loss) as tensors on the device: no host sync per step on a GPU (tested with
    torch.cuda.set_sync_debug_mode in tests/test_sync.py where CUDA is available)."""
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    loss = torch.zeros((), device=x.device)
    # On a CPU checking every batch costs nothing, so a divergence stops at once; on a GPU
    # that would sync every step, so the check waits for the epoch's end.
    check_each_batch = x.device.type == "cpu"
    for i in range(0, len(perm), batch_size):
        idx = perm[i:i + batch_size]
        xb, yb = x[idx], y[idx]
        with autocast(precision, x.device):
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
        if check_each_batch and not math.isfinite(loss.item()):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "after_step"):
            model.after_step()
        loss_sum += loss.detach().float() * len(idx)
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum, correct, loss


def finish(model, data, result: dict, files: CellFiles, cell_id: str, config: dict,
           filters_used: int, save_weights: bool,
           scores: dict[str, tuple[float, float]] | None = None) -> dict:
    """The final full evaluation of every split, and the weights when the study keeps them.
    `scores`: each split's (loss, accuracy) where the caller evaluated them already (a fused
    group evaluates its members at once)."""
    t0 = time.perf_counter()
    for split, (x, y) in data.splits().items():
        result[f"{split}_loss"], result[f"{split}_acc"] = (
            scores[split] if scores is not None else evaluate(model, x, y))
    result["wall_s"] += time.perf_counter() - t0
    result["status"] = "ok"
    if save_weights:
        rel = files.save_weights(cell_id, _to_bytes({
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "config": config,
            "filters_used": filters_used, "in_channels": data.in_channels,
            "n_classes": data.n_classes, "image_size": list(data.train_x.shape[-2:])}))
        if rel:
            result["weights_path"] = rel
    return result


def train_cell(config: dict, cell_id: str, opts: TrialOptions, attempt: int = 1,
               report: Callable[[dict], None] | None = None, files: CellFiles | None = None,
               raw: "datasets.Raw | None" = None) -> tuple[dict, list[dict]]:
    """Train one cell to the end (or to divergence); returns (result fields, epoch rows).

    Raises on errors; `run_cell` turns them into retries and a failed row.
    """
    device, data, model, filters_used, opt = _setup(config, opts, raw)
    files = files if files is not None else Store(opts.results_dir)
    epochs, start_epoch, wall_s = restore(files, cell_id, model, opt, device)
    n, diverged, last_saved = len(data.train_x), None, time.perf_counter()
    if interrupt.should_stop():  # asked to stop before it began: nothing to save
        raise interrupt.CellInterrupted(cell_id)
    for epoch in range(start_epoch, config["epochs"] + 1):
        if _fault_matches(opts.inject_fault, config, epoch, attempt):
            inject_fault(opts, f"injected fault at epoch {epoch} (attempt {attempt})")
        hold_epoch(opts)
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(model, opt, data.train_x, data.train_y,
                                            config["batch_size"], config["seed"], epoch,
                                            config["epochs"], config.get("precision", "fp32"))
        train_s = time.perf_counter() - t0  # train_epoch's last .item() waited for the GPU
        if not math.isfinite(train_loss):
            diverged = f"non-finite training loss at epoch {epoch}"
            break
        val_loss, val_acc = evaluate(model, data.val_x, data.val_y)
        if not math.isfinite(val_loss):
            diverged = f"non-finite validation loss at epoch {epoch}"
            break
        wall_s += time.perf_counter() - t0
        epochs.append({"cell_id": cell_id, "epoch": epoch, "train_loss": train_loss,
                       "val_loss": val_loss, "train_acc": train_acc, "val_acc": val_acc,
                       "wall_s": wall_s, "train_s": train_s})
        # Time-based: at most one checkpoint per checkpoint_every_s (a resume loses at most
        # that), none after the last epoch (the row itself lands next).
        stop = epoch < config["epochs"] and interrupt.should_stop()
        if stop or (epoch < config["epochs"]
                    and time.perf_counter() - last_saved >= opts.checkpoint_every_s):
            checkpoint(files, cell_id, epoch, model, opt, epochs, wall_s, device)
            last_saved = time.perf_counter()
        if stop:  # a batch system's warning: this epoch is saved, the rest runs on resume
            raise interrupt.CellInterrupted(cell_id)
        if report is not None:
            report({"epoch": epoch})  # a heartbeat: the epoch rows travel with the final row
    result = {
        "n_params": n_params(model), "filters_used": filters_used, "n_train": n,
        "n_val": len(data.val_x), "n_test": len(data.test_x), "n_classes": data.n_classes,
        "epochs_done": len(epochs), "wall_s": wall_s, "device": str(device),
        "device_name": device_name(device),
        "parallel_body": getattr(model, "parallel_body", None)
        if config["architecture"] == "parallel" else None,
        "resumed_from_epoch": start_epoch - 1,
        "pruned_branches": getattr(model, "pruned_branches", None),
    }
    if diverged:
        return {**result, "status": "diverged", "error": diverged}, epochs
    return finish(model, data, result, files, cell_id, config, filters_used,
                  opts.save_weights), epochs


def _last_line(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def run_cell(cell: dict, opts: TrialOptions, report: Callable[[dict], None] | None = None,
             node_id: str = "", files: CellFiles | None = None,
             raw: "datasets.Raw | None" = None, attempts_before: int = 0,
             started: "dt.datetime | None" = None) -> tuple[dict, list[dict]]:
    """The trial function: train a cell, retrying errors, and return its finished row.

    `cell` is `sweep.Cell.to_dict()`. Never raises for a cell's own
    errors: after `max_failures` retries the row says status = failed with the error's last
    line, so one bad cell cannot stop a study. `attempts_before`: attempts the cell already
    had in a fused group (study.fused.train), counted on in its row.
    """
    config, cell_id = cell["config"], cell["cell_id"]
    files = files if files is not None else Store(opts.results_dir)
    started = started or now()
    attempt, last_error = attempts_before, None
    result, epochs = None, []
    while attempt <= opts.max_failures + attempts_before:
        attempt += 1
        try:
            result, epochs = train_cell(config, cell_id, opts, attempt, report, files, raw)
            break
        except interrupt.CellInterrupted:
            raise  # not the cell's error: no retry, no row
        except datasets.DatasetError as e:  # deterministic: retrying cannot help
            last_error = str(e)
            break
        except Exception as e:  # noqa: BLE001 - any error of the cell's own is recorded
            last_error = _last_line(e)
            if torch.cuda.is_available() and "out of memory" in last_error.lower():
                torch.cuda.empty_cache()
    if result is None:
        ckpt = _load_checkpoint(files, cell_id)
        epochs = ckpt["epochs"] if ckpt is not None else []
        result = failed_result(last_error, len(epochs))
    return cell_row(cell, result, study=opts.study, attempts=attempt, started_at=started,
                    host=socket.gethostname(), node_id=node_id,
                    device=str(_pick_device(opts.device))), epochs

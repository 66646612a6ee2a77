"""Which cells may train together as one fused group (horizontal fusion, HFTA-style), no torch.

Cells fuse when their parameter tensors have the same shapes and they train for the same
number of steps on the same data: the same dataset, layers, filters, kernel, pool, head,
batch_norm, batch_size, epochs, precision, max_train_examples, val_fraction and match_params
(GROUP_KEYS). Members may differ in seed (initial weights and batch order), lr, weight_decay,
activation and architecture among FUSABLE: `sequential`, `parallel` and `plain` are built
from the same modules and differ only in which tensor each unit reads. The other zoo
families train solo.

A group never splits a twin unit: the cells of one `pair_key` (a deep cell and its shallow
twin at one seed) train in the same group, so whatever fusion does to a cell it does to
both sides of a comparison. A unit larger than K (three architectures at K = 2) is a group
of its own.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable

from .values import parse_off_auto_or_count

FUSABLE = ("sequential", "parallel", "plain")
GROUP_KEYS = ("dataset", "layers", "filters", "kernel", "pool", "head", "batch_norm",
              "batch_size", "epochs", "precision", "max_train_examples", "val_fraction",
              "match_params")
# The keys members may differ in; anything else that differs keeps cells apart.
MEMBER_KEYS = ("architecture", "activation", "seed", "lr", "weight_decay")
MAX_K = 64  # --fuse K above this is refused: one group's step would outgrow any cache


def group_key(config: dict) -> tuple | None:
    """The key of the cells this cell may fuse with, or None where it trains solo."""
    if config.get("architecture") not in FUSABLE:
        return None
    extra = set(config) - set(GROUP_KEYS) - set(MEMBER_KEYS)
    # match_params is absent from sequential cells (False elsewhere): the three are built
    # alike, so it changes no width among them
    key = {k: config.get(k) for k in GROUP_KEYS}
    key["match_params"] = bool(key["match_params"])
    return tuple(key.items()) + tuple(
        sorted((k, config[k]) for k in extra))


def pack(cells: Iterable, k: int | Callable[[dict], int]) -> list[list]:
    """The cells (sweep.Cell) in units of training: lists of up to k cells that share a
    group key, twin units whole, in the order the cells came (the first cell of a group
    places it). `k` may be a function of a cell's config (auto_k). k <= 1, or a cell with
    no key: a list of one."""
    cells = list(cells)
    size = k if callable(k) else (lambda config: k)
    if not callable(k) and k <= 1:
        return [[c] for c in cells]
    units: dict[tuple, dict[str, list]] = {}  # group key -> pair_key -> cells
    solo: list[list] = []
    order: list[tuple] = []  # (kind, key) in first-seen order
    for c in cells:
        key = group_key(c.config)
        if key is None or size(c.config) <= 1:
            solo.append([c])
            order.append(("solo", len(solo) - 1))
            continue
        if key not in units:
            units[key] = {}
            order.append(("key", key))
        units[key].setdefault(c.pair_key, []).append(c)
    out: list[list] = []
    for kind, key in order:
        if kind == "solo":
            out.append(solo[key])
            continue
        group: list = []
        cap = None
        for unit in units[key].values():
            cap = cap or size(unit[0].config)
            if group and len(group) + len(unit) > cap:
                out.append(group)
                group = []
            group = group + unit
        if group:
            out.append(group)
    return out


def group_id(cell_ids: Iterable[str]) -> str:
    """The `fused_group` of cells that trained as one group: a hash of their ids, in order."""
    return "g" + hashlib.sha256(",".join(cell_ids).encode()).hexdigest()[:15]


def parse_fuse(value: str) -> int | str:
    """--fuse's value: "off" (solo), "auto" or a whole K >= 1 (1 is solo too)."""
    return parse_off_auto_or_count(value, "--fuse", "K", MAX_K)


# --fuse auto: a group's activations stay within this many bytes per GPU of the trial (a
# quarter of a 16 GB card; an out-of-memory error halves the group anyway), and K <= AUTO_MAX_K.
AUTO_BYTES_PER_GPU = 4 * 2**30
AUTO_MAX_K = 16
# Tensors autograd keeps per conv unit (conv output, BatchNorm output, activation output, the
# sum), plus a few for the stem and head: a rough count, on the safe side.
_SAVED_PER_UNIT, _SAVED_EXTRA = 4, 4


def activation_bytes(config: dict) -> int:
    """About the bytes of activations one cell keeps for its backward pass in one step."""
    from .params import DATASET_SIZES

    ds = DATASET_SIZES[config["dataset"]]
    pool = config.get("pool") or 1
    plane = (ds.height // pool) * (ds.width // pool)
    values = config["batch_size"] * config["filters"] * plane * (
        _SAVED_PER_UNIT * config["layers"] + _SAVED_EXTRA)
    return values * (2 if config.get("precision") == "bf16" else 4)


def auto_k(config: dict, gpus: float) -> int:
    """--fuse auto's K for a cell's group on a trial with `gpus` GPUs: as many members as
    keep the activations within AUTO_BYTES_PER_GPU per GPU, 1 to AUTO_MAX_K."""
    budget = AUTO_BYTES_PER_GPU * max(gpus, 0.0)
    return int(max(1, min(AUTO_MAX_K, budget // max(1, activation_bytes(config)))))

"""Which cells train the same network: a canonical "network identity" per cell (no torch).

Some cells of a grid are, bit for bit, the same network as another cell: the same modules
created in the same order (so the same initial weights under the same seed), the same
forward and backward arithmetic, the same batches. Training both answers nothing new, and a
statistic that counts them as a deep/shallow comparison counts a network against itself.

Of such a group one cell is trained; the others are its *same-network copies*, recorded from
it (column `same_network_as`). A *twin* is something else: a cell's deep/shallow partner.

Each rule below names a condition under which an architecture *is* the `sequential` residual
stack at the same shared settings. Every rule is checked with torch in
tests/test_same_network.py::test_same_network_rules_are_bit_identical (losses and every weight
after AdamW steps, with and without batch norm); claim nothing here that test does not cover.

`network_id(config)` is the cell_id of the canonical cell: for a cell a rule matches, the
`sequential` cell at its shared settings; for every other cell, its own cell_id. Cells with
equal network_id are one network; detection is a grouping, not a list of special cases.
"""
from __future__ import annotations

from typing import Callable, Iterable

from .params import ARCH_SPECIFIC, PARAMS
from .spec import config_id
from .values import plain_value

# architecture -> (condition on the cell's config, why it is the sequential stack)
SAME_AS_SEQUENTIAL: dict[str, tuple[Callable[[dict], bool], str]] = {
    "parallel": (lambda c: c.get("layers") == 1,
                 "x + f(x) with one branch: the parallel sum of one branch is the stack"),
    "highway": (lambda c: c.get("gate") == "residual",
                "gate residual fixes T = C = 1: H(x)*1 + x*1 = x + f(x) in every layer"),
    "merge_and_run": (lambda c: c.get("branches") == 1,
                      "one stream: the merge is the identity, each block is x + f(x)"),
    "deeply_fused": (lambda c: c.get("shallow") == "identity"
                     and (c.get("fuse_every") == 1 or c.get("layers") == 1),
                     "identity shallow net and one conv per block: x + f(x) per block"),
    "learned_connectivity": (lambda c: c.get("branches") == 1 and c.get("layers") == 1,
                             "one block of one branch and no mask: x + f(x)"),
}
CANONICAL = "sequential"


def canonical_config(config: dict) -> dict:
    """The config of the network this cell trains, written as the canonical cell's config."""
    arch = config["architecture"]
    rule = SAME_AS_SEQUENTIAL.get(arch)
    if rule is None or not rule[0](config):
        return config
    # The sequential cell carries no architecture-specific parameter (match_params included:
    # matching a net's width to the sequential twin's count is a no-op when it is that net).
    return {k: v for k, v in config.items()
            if k not in ARCH_SPECIFIC and k != "architecture"} | {"architecture": CANONICAL}


def network_id(config: dict) -> str:
    return config_id(dict(sorted(canonical_config(config).items())))


def is_canonical(config: dict) -> bool:
    return canonical_config(config) is config


def why(config: dict) -> str | None:
    """One line on why this cell is the canonical network, or None if it is its own."""
    rule = SAME_AS_SEQUENTIAL.get(config["architecture"])
    return rule[1] if rule and rule[0](config) else None


def groups(cells: Iterable) -> dict[str, list]:
    """network_id -> the cells (of a spec's grid, in grid order) that train that network."""
    out: dict[str, list] = {}
    for c in cells:
        # A canonical cell's network_id is its own cell_id: no second hash (50,000 cells)
        nid = c.cell_id if is_canonical(c.config) else network_id(c.config)
        out.setdefault(nid, []).append(c)
    return out


def trained_cell(group: list):
    """The one cell of a group that is trained: the canonical cell where the grid has it
    (its cell_id is the group's network_id), else the first in grid order."""
    nid = network_id(group[0].config)
    return next((c for c in group if c.cell_id == nid), group[0])


def config_from_row(row: dict) -> dict:
    """A cell's config from a store row: its architecture's parameters, with the types of
    sweep.params (Parquet and pandas turn ints into floats next to nulls)."""
    arch = row["architecture"]
    out = {}
    for name, p in PARAMS.items():
        if p.applies_to(arch) and name in row:
            v = plain_value(row[name], p.type)
            if v is not None:
                out[name] = v
    return out


__all__ = ["SAME_AS_SEQUENTIAL", "canonical_config", "network_id", "is_canonical", "why",
           "groups", "trained_cell", "config_from_row"]

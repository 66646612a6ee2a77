"""How far fused training drifts from solo training over whole cells, against the chaos floor.

Training is chaotic: any float difference, however small, grows over a cell's steps. Fused
training rounds differently from solo training (grouped kernels, batched heads), so a fused
cell's final values differ from its solo run's. The yardstick is the one-ulp floor: the
same drift between two solo runs of each cell whose initial weights differ by one ulp
(TrialOptions.init_ulps: torch.nextafter of every parameter after the build). Fused drift of
the same order as that floor means fusion changes a cell no more than rounding noise does;
both should sit far below the seed-to-seed spread, the noise the study's comparisons are
judged against.

The figure is the median over cells of |log(final val loss A / final val loss B)|. Used by
benchmarks/fuse.py and tests/test_fuse_bench.py; real training, one thread per cell.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
from typing import Iterable

from sweep import Cell
from sweep.fusion import pack

from ..options import TrialOptions
from ..train import run_cell
from .train import run_group


def _as_dict(cell) -> dict:
    return cell if isinstance(cell, dict) else cell.to_dict()


def final_val_losses(cells: Iterable, opts: TrialOptions, fuse: int = 1, init_ulps: int = 0,
                     raw=None) -> dict[str, float]:
    """Each cell's final validation loss (its row's val_loss; NaN where it did not finish ok),
    trained solo (fuse <= 1) or packed into fused groups of up to `fuse` cells as the driver
    packs them (sweep.fusion.pack). `cells`: sweep.Cell or their to_dict(). Checkpoints go
    to a throwaway folder: a drift run never resumes, and never touches a study's."""
    cells = list(cells)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="drift-") as tmp:
        run_opts = dataclasses.replace(opts, results_dir=tmp, init_ulps=init_ulps,
                                       max_failures=0, checkpoint_every_s=1e12)
        as_cells = [Cell.from_dict(c) if isinstance(c, dict) else c for c in cells]
        for unit in pack(as_cells, fuse):
            dicts = [c.to_dict() for c in unit]
            rows = ([run_cell(dicts[0], run_opts, raw=raw)] if len(dicts) == 1
                    else run_group(dicts, run_opts, raw=raw))
            for d, (row, _) in zip(dicts, rows):
                ok = row.get("status") == "ok" and row.get("val_loss") is not None
                out[d["cell_id"]] = float(row["val_loss"]) if ok else math.nan
    return out


def abs_log_ratios(a: dict[str, float], b: dict[str, float]) -> list[float]:
    """|log(a/b)| per cell present, finite and positive in both."""
    return [abs(math.log(a[k] / b[k])) for k in a if k in b
            and all(math.isfinite(v) and v > 0 for v in (a[k], b[k]))]


def median_abs_log_ratio(a: dict[str, float], b: dict[str, float]) -> float:
    r = abs_log_ratios(a, b)
    return statistics.median(r) if r else math.nan


@dataclasses.dataclass
class Drift:
    """The equality figures of one set of cells (medians of |log ratio| of final val loss)."""
    fused: float  # fused (groups of up to k) against solo
    ulp_floor: float  # solo with every initial weight one ulp up, against solo
    seed: float  # seed 0 against seed 1 of the same setting, solo
    k: int
    n_cells: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def ulp_floor(cells: Iterable, opts: TrialOptions, solo: dict[str, float] | None = None,
              ulps: int = 1, raw=None) -> tuple[float, dict[str, float]]:
    """(the one-ulp floor, the solo losses it was measured against); `solo` reuses a solo
    run's losses of the same cells and options."""
    cells = list(cells)
    solo = solo if solo is not None else final_val_losses(cells, opts, raw=raw)
    return median_abs_log_ratio(final_val_losses(cells, opts, init_ulps=ulps, raw=raw), solo), solo


def fused_drift(cells: Iterable, opts: TrialOptions, k: int,
                solo: dict[str, float] | None = None, raw=None
                ) -> tuple[float, dict[str, float], dict[str, float]]:
    """(fused-against-solo drift at groups of up to k, the solo losses, the fused losses)."""
    cells = list(cells)
    solo = solo if solo is not None else final_val_losses(cells, opts, raw=raw)
    fused = final_val_losses(cells, opts, fuse=k, raw=raw)
    return median_abs_log_ratio(fused, solo), solo, fused


def seed_pairs(cells: Iterable) -> list[tuple[str, str]]:
    """(cell_id at one seed, cell_id at the next seed) of cells equal in all but the seed."""
    by_setting: dict[tuple, dict[int, str]] = {}
    for c in map(_as_dict, cells):
        config = c["config"]
        key = tuple(sorted((k, repr(v)) for k, v in config.items() if k != "seed"))
        by_setting.setdefault(key, {})[config["seed"]] = c["cell_id"]
    pairs = []
    for seeds in by_setting.values():
        s = sorted(seeds)
        pairs += [(seeds[a], seeds[b]) for a, b in zip(s, s[1:])]
    return pairs


def seed_median(cells: Iterable, losses: dict[str, float]) -> float:
    """Median |log ratio| of final val loss between neighbouring seeds of one setting."""
    pairs = seed_pairs(cells)
    return median_abs_log_ratio({a: losses[a] for a, _ in pairs if a in losses},
                                {a: losses[b] for a, b in pairs if b in losses})


def measure(cells: Iterable, opts: TrialOptions, k: int, raw=None) -> Drift:
    """All three figures over `cells` (which should hold at least two seeds per setting):
    one solo run, one one-ulp solo run and one fused run of every cell."""
    cells = list(cells)
    fused, solo, _ = fused_drift(cells, opts, k, raw=raw)
    floor, _ = ulp_floor(cells, opts, solo=solo, raw=raw)
    return Drift(fused, floor, seed_median(cells, solo), k, len(cells))


__all__ = ["Drift", "abs_log_ratios", "final_val_losses", "fused_drift", "measure",
           "median_abs_log_ratio", "seed_median", "seed_pairs", "ulp_floor"]

"""Study spec (TOML) -> validated Spec -> list of Cells.

A spec is small and declarative: ``[study]`` names the study, ``[grid]`` gives each parameter
either a scalar (fixed) or a list (an axis of the Cartesian product), ``[grid.<architecture>]``
tables give axes that only that architecture's cells get, and ``[[exclude]]`` tables drop the
cells matching all of their keys.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .design import DesignError, parse_design
from .params import ARCH_SPECIFIC, ARCHITECTURES, PARAMS, REQUIRED, UNHASHED_DEFAULTS, Param

STUDY_KEYS = {"name": str, "description": str, "save_weights": bool}
ANALYSIS_KEYS = ("margin", "alpha", "pilot")
# The equivalence margin delta: the ratio b/a counts as "the same" inside [1/(1+delta), 1+delta].
# 10 %: a loss ratio of 1.1 is small next to the gaps between Q bins in the paper's Table 2
# (factors of 2 to 100) and of the order of what re-seeding small nets moves the loss; "seed"
# takes it from the study's own repeats instead.
DEFAULT_MARGIN = 0.1
SEED_MARGIN = "seed"


class SpecError(ValueError):
    """A user error in a spec: the message is one line that says what to change."""


@contextlib.contextmanager
def as_spec_error(*kinds: type[BaseException]):
    """Errors of `kinds` raised inside become a SpecError (one line, exit 2) of their text."""
    try:
        yield
    except kinds as e:
        raise SpecError(str(e)) from None


# Names users bring from other tools, which string similarity alone would not find.
ALIASES = {"learning_rate": "lr", "learningrate": "lr", "wd": "weight_decay",
           "depth": "layers", "n_layers": "layers", "num_layers": "layers", "width": "filters",
           "channels": "filters", "n_filters": "filters", "kernel_size": "kernel",
           "arch": "architecture", "model": "architecture", "bs": "batch_size",
           "n_epochs": "epochs", "num_epochs": "epochs", "bn": "batch_norm",
           "batchnorm": "batch_norm", "act": "activation", "data": "dataset"}


def did_you_mean(word, candidates) -> str:
    """' (did you mean 'lr'?)' for the closest candidate, or '' when none is close."""
    names = [str(c) for c in candidates]
    w = str(word)
    hit = ALIASES.get(w.lower())
    if hit not in names:
        close = difflib.get_close_matches(w, names, n=1, cutoff=0.6) or difflib.get_close_matches(
            w.lower(), [n.lower() for n in names], n=1, cutoff=0.6)
        hit = next((n for n in names if close and n.lower() == close[0].lower()), None)
    return f" (did you mean '{hit}'?)" if hit else ""


def config_id(config: dict) -> str:
    """The id of a config: a cell's cell_id, and (of its shared settings) its pair_key."""
    # json.dumps writes floats with repr(), the shortest round-trip spelling, so 3e-3 and
    # 0.003 hash alike; sort_keys makes the id independent of key order. Parameters added
    # later (precision) hash only when off their default: older ids stay as they were.
    canon = _CANON.encode({k: v for k, v in config.items() if v is not None
                           and (k not in UNHASHED_DEFAULTS or v != UNHASHED_DEFAULTS[k])})
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


# What json.dumps(..., sort_keys=True, separators=(",", ":")) builds on every call.
_CANON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Cell:
    config: dict
    cell_id: str
    pair_key: str

    @classmethod
    def from_config(cls, config: dict) -> "Cell":
        config = dict(sorted(config.items()))
        shared = {k: v for k, v in config.items()
                  if k != "architecture" and k not in ARCH_SPECIFIC}
        return cls(config=config, cell_id=config_id(config), pair_key=config_id(shared))

    def __getitem__(self, key):
        return self.config[key]

    def to_dict(self) -> dict:
        """The plain form a cell travels in (Ray's object store, a trial's arguments)."""
        return {"config": self.config, "cell_id": self.cell_id, "pair_key": self.pair_key}

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(config=d["config"], cell_id=d["cell_id"], pair_key=d["pair_key"])


@dataclass
class Spec:
    name: str
    grid: dict[str, list]  # parameter -> list of values (scalars become 1-element lists)
    arch_grids: dict[str, dict[str, list]] = field(default_factory=dict)
    exclude: list[dict[str, list]] = field(default_factory=list)
    description: str = ""
    save_weights: bool = False
    source: str = ""  # the TOML text, saved with the results
    # [analysis]: how the results are judged (never part of a cell_id), e.g. {"margin": 0.1}
    analysis: dict = field(default_factory=dict)
    # [design] (sweep.design): planned looks for `study run --until-decided`, and the seeds
    # its later looks added (already in the grid)
    design: dict = field(default_factory=dict)
    origin: str = ""  # file path or "preset:<name>"

    # -- the grid ---------------------------------------------------------------------------
    def axes(self) -> dict[str, list]:
        """Parameters with more than one value (the swept axes), in spec order."""
        out = {k: v for k, v in self.grid.items() if len(v) > 1}
        for arch, g in self.arch_grids.items():
            out.update({f"{arch}.{k}": v for k, v in g.items() if len(v) > 1})
        return out

    def _axes(self, arch: str) -> tuple[list[str], list[list]]:
        """The parameter names and value lists of one architecture's part of the grid."""
        keys, value_lists = [], []
        for p in PARAMS.values():
            if p.name == "architecture" or not p.applies_to(arch):
                continue
            keys.append(p.name)
            value_lists.append(self.arch_grids.get(arch, {}).get(
                p.name, self.grid.get(p.name, [p.default_for(arch)])))
        return keys, value_lists

    def max_cells(self) -> int:
        """An upper bound of the grid's size from its axes alone (each architecture's product
        of value counts, before [[exclude]]): known without enumerating a cell."""
        return sum(math.prod(len(v) for v in self._axes(arch)[1])
                   for arch in self.grid["architecture"])

    def _configs(self, arch: str):
        """One architecture's cell configs, in grid order, exclusions applied (no hashing)."""
        keys, value_lists = self._axes(arch)
        for combo in itertools.product(*value_lists):
            config = {"architecture": arch, **dict(zip(keys, combo))}
            if arch == "learned_connectivity" and config.get("active_inputs") is None:
                config["active_inputs"] = max(1, config["branches"] // 2)
            if not any(_matches(config, ex) for ex in self.exclude):
                yield config

    def _check(self) -> None:
        """What no cell of the grid may be, checked on the axes (not cell by cell)."""
        if "learned_connectivity" in self.grid["architecture"]:
            keys, value_lists = self._axes("learned_connectivity")
            axes = dict(zip(keys, value_lists))
            for a, b in itertools.product(axes["active_inputs"], axes["branches"]):
                if a is not None and a > b:
                    raise SpecError(
                        f"spec error: active_inputs = {a} exceeds branches = {b} for "
                        "learned_connectivity; a branch can sum at most all of the previous "
                        "block's branches")
        if not any(next(self._configs(arch), None) for arch in self.grid["architecture"]):
            raise SpecError("spec error: the [[exclude]] tables drop every cell of the grid")

    def cells(self) -> list[Cell]:
        by_arch = [[Cell.from_config(c) for c in self._configs(arch)]
                   for arch in self.grid["architecture"]]
        # Interleave architectures so a cell's twins run next to it: a partial study then
        # holds complete pairs rather than all of one architecture.
        order: dict[str, int] = {}
        for cells in by_arch:
            for c in cells:
                order.setdefault(c.pair_key, len(order))
        seen, out = set(), []
        for arch_i, c in sorted(((i, c) for i, cells in enumerate(by_arch) for c in cells),
                                key=lambda t: (order[t[1].pair_key], t[0])):
            if c.cell_id not in seen:
                seen.add(c.cell_id)
                out.append(c)
        return out

    def value_sets(self) -> dict[str, set]:
        """Every parameter's effective values (defaults filled in), per architecture where
        the parameter is architecture-specific."""
        out = {}
        for name, p in PARAMS.items():
            if p.architectures is None:
                out[name] = set(map(_canon, self.grid.get(name, [p.default])))
        for arch in self.grid["architecture"]:
            for p in PARAMS.values():
                if p.architectures is not None and p.applies_to(arch):
                    vals = self.arch_grids.get(arch, {}).get(
                        p.name, self.grid.get(p.name, [p.default_for(arch)]))
                    out[f"{arch}.{p.name}"] = set(map(_canon, vals))
        return out

    def check_extends(self, old: "Spec") -> None:
        """Refuse a spec that changes or drops a value an existing study already ran with.

        Adding values to an axis (or turning a fixed value into an axis containing it) is an
        extension; anything else would mix incomparable cells in one results folder.
        """
        new_sets = self.value_sets()
        for key, old_vals in old.value_sets().items():
            missing = old_vals - new_sets.get(key, set())
            if missing:
                raise SpecError(
                    f"spec changes '{key}' of the existing study: it ran with "
                    f"{_fmt(old_vals)}, the new spec has {_fmt(new_sets.get(key, set())) or 'none'}; "
                    "to extend the study keep the old values and add new ones, "
                    "to start a new study give it another [study] name or --results folder")


def _canon(v):
    return json.dumps(v)


def _fmt(vals) -> str:
    return ", ".join(sorted(str(json.loads(v)) for v in vals))


def _matches(config: dict, exclude: dict[str, list]) -> bool:
    return all(config.get(k) in vals for k, vals in exclude.items())


# -- parsing and validation ------------------------------------------------------------------
def _check_value(p: Param, value: Any, where: str) -> Any:
    t = p.type
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise SpecError(f"spec error: '{where}' must be {t.__name__} (or a list of them), got {value!r}")
    if p.choices is not None and value not in p.choices:
        raise SpecError(f"spec error: '{where}' = {value!r} is not allowed"
                        f"{did_you_mean(value, p.choices)}; allowed values: "
                        + ", ".join(map(str, p.choices)))
    if p.minimum is not None and value < p.minimum:
        raise SpecError(f"spec error: '{where}' = {value!r} is below its minimum {p.minimum}")
    if p.maximum is not None and value > p.maximum:
        raise SpecError(f"spec error: '{where}' = {value!r} is above its maximum {p.maximum}")
    return value


def _values(p: Param, raw: Any, where: str) -> list:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise SpecError(f"spec error: '{where}' is an empty list; give at least one value")
    out, seen = [], set()
    for v in items:
        v = _check_value(p, v, where)
        if v not in seen:  # a set: a list here made a 25,000-seed axis take seconds
            seen.add(v)
            out.append(v)
    return out


def _unknown(key: str, where: str, allowed) -> SpecError:
    allowed = list(allowed)
    return SpecError(f"spec error: unknown key '{where}{key}'{did_you_mean(key, allowed)}; "
                     "allowed keys: " + ", ".join(allowed))


def _parse_study(raw: dict, origin: str) -> tuple[dict, str]:
    """The [study] table, checked, and the study's name."""
    study = raw.get("study", {})
    if not isinstance(study, dict):
        raise SpecError("spec error: 'study' must be a table: [study]")
    for key, value in study.items():
        if key not in STUDY_KEYS:
            raise _unknown(key, "study.", STUDY_KEYS)
        if not isinstance(value, STUDY_KEYS[key]):
            raise SpecError(f"spec error: 'study.{key}' must be {STUDY_KEYS[key].__name__}")
    name = study.get("name") or (Path(origin.removeprefix("preset:")).stem
                                 if not origin.startswith("<") else "study")
    if not all(ch.isalnum() or ch in "-_." for ch in name):
        raise SpecError(f"spec error: study.name {name!r} may hold only letters, digits, '-', '_' and '.'")
    return study, name


def parse_margin(value, where: str = "analysis.margin"):
    """A margin as the spec or --margin gives it: a positive number (delta) or "seed"."""
    if isinstance(value, str):
        text = value.strip()
        if text == SEED_MARGIN:
            return SEED_MARGIN
        try:
            value = float(text)
        except ValueError:
            raise SpecError(f"spec error: '{where}' = {value!r} is neither a number nor "
                            f"'{SEED_MARGIN}'; give a relative margin such as 0.1 (±10 %) or "
                            f"'{SEED_MARGIN}' (from the seed noise)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value:
        raise SpecError(f"spec error: '{where}' must be a positive number such as 0.1 or "
                        f"'{SEED_MARGIN}', got {value!r}")
    if not 0 < value < float("inf"):
        raise SpecError(f"spec error: '{where}' = {value!r} must be positive (a relative "
                        "margin: 0.1 means the ratio b/a within 1/1.1 and 1.1)")
    return float(value)


def _parse_analysis(raw) -> dict:
    """The [analysis] table: how results are judged; it changes no cell_id."""
    if not isinstance(raw, dict):
        raise SpecError("spec error: 'analysis' must be a table: [analysis]")
    for key in raw:
        if key not in ANALYSIS_KEYS:
            raise _unknown(key, "analysis.", ANALYSIS_KEYS)
    out = {"margin": parse_margin(raw["margin"])} if "margin" in raw else {}
    if "alpha" in raw:
        out["alpha"] = parse_alpha(raw["alpha"])
    if "pilot" in raw:
        # an earlier study's results folder: `margin = "seed"` is then resolved from its seed
        # noise when the plan is saved, so the margin is fixed before this study's data
        if not isinstance(raw["pilot"], str) or not raw["pilot"].strip():
            raise SpecError("spec error: 'analysis.pilot' must be the path of a pilot study's "
                            f"results folder, got {raw['pilot']!r}")
        out["pilot"] = raw["pilot"].strip()
    return out


def parse_alpha(value, where: str = "analysis.alpha") -> float:
    """The verdicts' level: a number strictly between 0 and 0.5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 0.5:
        raise SpecError(f"spec error: '{where}' must be a level between 0 and 0.5 such as "
                        f"0.05, got {value!r}")
    return float(value)


def _parse_grid(grid_raw) -> tuple[dict[str, list], dict[str, dict[str, list]]]:
    """The [grid] table and its [grid.<architecture>] sub-tables, checked: (grid, arch_grids)."""
    if not isinstance(grid_raw, dict):
        raise SpecError("spec error: the spec needs a [grid] table with at least "
                        + ", ".join(REQUIRED))
    grid: dict[str, list] = {}
    arch_grids: dict[str, dict[str, list]] = {}
    for key, value in grid_raw.items():
        if isinstance(value, dict):
            if key not in ARCHITECTURES:
                raise SpecError(f"spec error: [grid.{key}] is not an architecture"
                                f"{did_you_mean(key, ARCHITECTURES)}; a sub-table of "
                                f"[grid] holds one architecture's own axes; architectures: "
                                + ", ".join(ARCHITECTURES))
            sub = {}
            for k2, v2 in value.items():
                p = PARAMS.get(k2)
                if p is None or k2 == "architecture":
                    raise _unknown(k2, f"grid.{key}.", [n for n in PARAMS if n != "architecture"])
                if not p.applies_to(key):
                    raise SpecError(f"spec error: 'grid.{key}.{k2}' does not apply to {key}; "
                                    f"{k2} is used by: " + ", ".join(p.architectures or ()))
                sub[k2] = _values(p, v2, f"grid.{key}.{k2}")
            arch_grids[key] = sub
            continue
        p = PARAMS.get(key)
        if p is None:
            raise _unknown(key, "grid.", list(PARAMS) + ["<architecture> (a sub-table)"])
        grid[key] = _values(p, value, f"grid.{key}")
    for key in REQUIRED:
        if key not in grid:
            raise SpecError(f"spec error: [grid] lacks '{key}'; required keys: " + ", ".join(REQUIRED))
    for arch in arch_grids:
        if arch not in grid["architecture"]:
            raise SpecError(f"spec error: [grid.{arch}] is given but '{arch}' is not in "
                            "grid.architecture; add it there or drop the table")
    for key in grid:
        p = PARAMS[key]
        if p.architectures is not None and not any(p.applies_to(a) for a in grid["architecture"]):
            raise SpecError(f"spec error: 'grid.{key}' is used only by "
                            + ", ".join(p.architectures) + ", none of which is in grid.architecture")
    return grid, arch_grids


def _parse_exclude(ex_raw) -> list[dict[str, list]]:
    """The [[exclude]] tables, checked."""
    exclude = []
    if not isinstance(ex_raw, list):
        raise SpecError("spec error: exclusions are written as [[exclude]] tables")
    for i, ex in enumerate(ex_raw):
        if not ex:
            raise SpecError(f"spec error: [[exclude]] number {i + 1} is empty; it would drop every cell")
        entry = {}
        for k, v in ex.items():
            if k not in PARAMS:
                raise _unknown(k, "exclude.", PARAMS)
            entry[k] = _values(PARAMS[k], v, f"exclude.{k}")
        exclude.append(entry)
    return exclude


def parse_spec(text: str, origin: str = "<string>") -> Spec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"spec error: {origin} is not valid TOML: {e}") from None
    for key in raw:
        if key not in ("study", "grid", "exclude", "analysis", "design"):
            raise _unknown(key, "", ["study", "grid", "exclude", "analysis", "design"])
    study, name = _parse_study(raw, origin)
    grid, arch_grids = _parse_grid(raw.get("grid"))
    exclude = _parse_exclude(raw.get("exclude", []))
    with as_spec_error(DesignError):
        design = parse_design(raw.get("design"))
    if design:  # the looks' seeds join the grid: their cells are the study's
        base = grid.get("seed", [PARAMS["seed"].default])
        design["base_seeds"] = list(base)
        if design["added_seeds"]:
            grid["seed"] = base + [s for s in design["added_seeds"] if s not in base]
    spec = Spec(name=name, grid=grid, arch_grids=arch_grids, exclude=exclude,
                description=study.get("description", ""),
                save_weights=study.get("save_weights", False), source=text, origin=origin,
                analysis=_parse_analysis(raw.get("analysis", {})), design=design)
    spec._check()  # on the axes: a 50,000-cell grid is not enumerated to be parsed
    return spec


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("sweep.presets").iterdir()
                  if p.name.endswith(".toml"))


def load_spec(path_or_preset: str | Path) -> Spec:
    """A spec file path, or the name of a preset shipped with the package."""
    path = Path(path_or_preset)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"spec error: cannot read {path}: {e}") from None
        return parse_spec(text, origin=str(path))
    name = str(path_or_preset)
    if name in preset_names():
        text = resources.files("sweep.presets").joinpath(f"{name}.toml").read_text()
        return parse_spec(text, origin=f"preset:{name}")
    raise SpecError(f"no spec file or preset named '{name}'{did_you_mean(name, preset_names())}; "
                    "presets: " + ", ".join(preset_names())
                    + " (or give the path of a .toml spec file)")

"""The spec's [design] table: a study that grows by planned looks until its verdict is decided.

Kept apart from [analysis] (which only redraws): the design decides which cells run.

    [design]
    looks = 3          # 2-5 planned looks: look 1 is the spec's grid
    extend = "seeds"   # each later look adds the next seed to every setting

The seeds a `study run --until-decided` added are recorded in the results folder's spec.toml
as a `[design.extension]` table (and in design.json), so that the saved spec holds every cell
the study ran and the user's original spec, re-run, continues the study (study.sequential_run).
"""
from __future__ import annotations

DESIGN_KEYS = ("looks", "extend", "extension")
MIN_LOOKS, MAX_LOOKS = 2, 5
EXTENDS = ("seeds",)
# written by the tool below the user's text; the marker lets a later look rewrite it
EXTENSION_MARKER = "# added by `study run --until-decided` (see design.json): one seed per look"


class DesignError(ValueError):
    """Raised as sweep.spec.SpecError by the parser (one line)."""


def parse_design(raw) -> dict:
    """{} without a [design] table, else {"looks": K, "extend": "seeds", "added_seeds": [...]}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DesignError("spec error: 'design' must be a table: [design]")
    for key in raw:
        if key not in DESIGN_KEYS:
            raise DesignError(f"spec error: unknown key 'design.{key}'; allowed keys: looks, extend")
    looks = raw.get("looks")
    if looks is None:
        raise DesignError("spec error: [design] lacks 'looks'; give the planned number of looks, "
                          f"{MIN_LOOKS} to {MAX_LOOKS}, e.g. looks = 3")
    if isinstance(looks, bool) or not isinstance(looks, int) or not MIN_LOOKS <= looks <= MAX_LOOKS:
        raise DesignError(f"spec error: 'design.looks' must be a whole number from {MIN_LOOKS} to "
                          f"{MAX_LOOKS} (look 1 is the spec's grid), got {looks!r}")
    extend = raw.get("extend", "seeds")
    if extend not in EXTENDS:
        raise DesignError(f"spec error: 'design.extend' = {extend!r} is not allowed; allowed "
                          "values: seeds (each look adds the next seed to every setting)")
    ext = raw.get("extension", {})
    seeds = ext.get("seeds", []) if isinstance(ext, dict) else None
    if (seeds is None or set(ext) - {"seeds"} or not isinstance(seeds, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise DesignError("spec error: [design.extension] is written by `study run "
                          "--until-decided` and holds only seeds = [whole numbers >= 0]; "
                          "restore it from design.json or delete it to start over")
    if len(seeds) > looks - 1:
        raise DesignError(f"spec error: [design.extension] adds {len(seeds)} seeds, more than "
                          f"the {looks - 1} later looks of design.looks = {looks} allow")
    return {"looks": looks, "extend": extend, "added_seeds": list(seeds)}


def with_extension(source: str, seeds: list[int]) -> str:
    """The spec text with the design's added seeds recorded in a [design.extension] table at
    its end (replacing one written before): a new text, so the store's cell-id cache, keyed
    on the text, never mixes the grids before and after a look."""
    base = source.split("\n" + EXTENSION_MARKER, 1)[0].rstrip("\n")
    if not seeds:
        return base + "\n"
    return (f"{base}\n\n{EXTENSION_MARKER}\n[design.extension]\n"
            f"seeds = [{', '.join(str(int(s)) for s in seeds)}]\n")

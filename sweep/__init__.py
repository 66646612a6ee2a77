"""Sweep specs: a TOML file (or a named preset) -> validated Spec -> Cartesian grid of Cells.

Pure Python: imports neither torch nor ray, so specs can be planned anywhere.
"""
from .params import ARCHITECTURES, ARCH_SPECIFIC, DATASETS, PARAMS, Param
from .spec import Cell, Spec, SpecError, load_spec, parse_spec, preset_names

__all__ = ["ARCHITECTURES", "ARCH_SPECIFIC", "DATASETS", "PARAMS", "Param", "Cell", "Spec",
           "SpecError", "load_spec", "parse_spec", "preset_names"]

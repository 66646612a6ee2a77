"""Model zoo: a registry of architecture families (timm-style register / build / list).

One file per family holds its blocks, its builder and its registered variants. Every family
shares the stem, the head and the conv unit of `common.py`, so that `n_params` is comparable
across the `architecture` axis of a study.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# Families built from exactly the same modules as another (only the wiring differs): their
# parameter counts are the other's, so counting (study plan's Q coverage) builds one of them.
_PARAMS_LIKE: dict[str, str] = {}


def register(name: str, params_like: str | None = None):
    def deco(builder):
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = builder
        if params_like is not None:
            _PARAMS_LIKE[name] = params_like
        return builder
    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, **kwargs) -> nn.Module:
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(list_models())}") from None
    return builder(**kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Keys of a cell's config that are model hyper-parameters (the rest is training set-up).
# head and pool shape the stem and classifier every family shares (common.ConvNet).
COMMON_KEYS = ("layers", "filters", "kernel", "activation", "batch_norm", "head", "pool")


def model_kwargs(config: dict) -> dict:
    """A cell's config -> builder keyword arguments (common keys + its architecture's own).

    A common key missing from the config takes its default from the parameter table."""
    from sweep.params import PARAMS

    kw = {k: config[k] if k in config else PARAMS[k].default for k in COMMON_KEYS}
    for name, p in PARAMS.items():
        if p.architectures is not None and name != "match_params" and name in config:
            kw[name] = config[name]
    return kw


def image_size_for(config: dict, image_size=None) -> tuple[int, int]:
    """The inputs' (height, width): as given, else the known size of the cell's dataset."""
    if image_size is not None:
        return int(image_size[0]), int(image_size[1])
    from sweep.params import DATASET_SIZES

    ds = DATASET_SIZES.get(config.get("dataset"))
    if ds is None:
        raise ValueError(f"image size of dataset {config.get('dataset')!r} unknown; "
                         "pass image_size=(height, width)")
    return ds.height, ds.width


def build_for_cell(config: dict, in_channels: int, n_classes: int,
                   image_size: tuple[int, int] | None = None) -> tuple[nn.Module, int]:
    """Build the model of one cell; returns (model, filters actually used).

    `image_size` (height, width) defaults to the known size of the cell's dataset.
    With match_params the width is searched so that n_params is as close as integer widths
    allow to the `sequential` twin's (same layers, filters, kernel, ...): see `match_width`.
    """
    kw = model_kwargs(config)
    kw["image_size"] = image_size_for(config, image_size)
    if config.get("match_params"):
        kw["filters"] = match_width(config["architecture"], kw, in_channels, n_classes)
    return build(config["architecture"], in_channels=in_channels, n_classes=n_classes, **kw), kw["filters"]


@functools.lru_cache(maxsize=16384)
def _count(name: str, in_channels: int, n_classes: int, kw_items: tuple) -> int:
    # Built on the meta device: shapes only, no memory, no initialisation work.
    with torch.device("meta"):
        return n_params(build(name, in_channels=in_channels, n_classes=n_classes, **dict(kw_items)))


SKELETON_KEYS = ("head", "pool", "image_size")


@functools.lru_cache(maxsize=4096)
def _skeleton(in_channels: int, n_classes: int, filters: int, kernel: int, head: str, pool: int,
              image_size) -> int:
    from .common import ConvNet

    with torch.device("meta"):
        return n_params(ConvNet(in_channels, n_classes, filters, kernel, "relu", head=head,
                                pool=pool, image_size=image_size))


def count_params(name: str, kw: dict, in_channels: int, n_classes: int) -> int:
    """n_params of build(name, **kw) without building it for real (cached).

    Every family hands head, pool and image_size to ConvNet untouched and its body never
    sees them, so n_params = (net with the GAP head, no pool) - its skeleton + the skeleton
    with kw's stem and head: one body count serves every head and pool (study plan's Q
    coverage of the paper preset builds a third of the networks).
    """
    name = _PARAMS_LIKE.get(name, name)
    if not all(k in kw for k in SKELETON_KEYS):
        return _count(name, in_channels, n_classes, tuple(sorted(kw.items())))
    ref = {**kw, "head": "gap", "pool": 1, "image_size": None}
    skel = (in_channels, n_classes, kw["filters"], kw["kernel"])
    return (_count(name, in_channels, n_classes, tuple(sorted(ref.items())))
            - _skeleton(*skel, "gap", 1, None)
            + _skeleton(*skel, kw["head"], kw["pool"], tuple(kw["image_size"])))


def match_width(name: str, kw: dict, in_channels: int, n_classes: int) -> int:
    """The integer width whose n_params is closest to the `sequential` model's at kw.

    Within 1 % whenever integer widths allow it: a width step changes n_params by about
    2/width, so narrow nets (or families with many more convs, e.g. learned_connectivity,
    whose matched width is ~filters/sqrt(C)) may only get the closest count; ties go to the
    narrower width.
    """
    skeleton = [k for k in ("image_size",) if k in kw]
    target = _count("sequential", in_channels, n_classes,
                    tuple(sorted((k, kw[k]) for k in (*COMMON_KEYS, *skeleton) if k in kw)))

    def count(width: int) -> int:
        return _count(name, in_channels, n_classes, tuple(sorted({**kw, "filters": width}.items())))

    # n_params grows strictly with the width in every family: bracket, then bisect.
    lo, hi = 1, max(1, kw["filters"])
    while count(hi) < target:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [w for w in (lo - 1, lo) if w >= 1]
    return min(candidates, key=lambda w: (abs(count(w) - target), w))


# Importing the family modules registers them.
from . import residual  # noqa: E402,F401
from . import plain, highway, merge_and_run, deeply_fused, learned_connectivity  # noqa: E402,F401

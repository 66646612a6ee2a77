"""Model zoo: a registry of architecture families (timm-style register / build / list).

One file per family holds its blocks, its builder and its registered variants. Every family
shares the stem, the head and the conv unit of `common.py`, so that `n_params` is comparable
across the `architecture` axis of a study.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(builder):
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = builder
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
COMMON_KEYS = ("layers", "filters", "kernel", "activation", "batch_norm")


def model_kwargs(config: dict) -> dict:
    """A cell's config -> builder keyword arguments (common keys + its architecture's own)."""
    from sweep.params import PARAMS

    kw = {k: config[k] for k in COMMON_KEYS}
    for name, p in PARAMS.items():
        if p.architectures is not None and name != "match_params" and name in config:
            kw[name] = config[name]
    return kw


def build_for_cell(config: dict, in_channels: int, n_classes: int) -> tuple[nn.Module, int]:
    """Build the model of one cell; returns (model, filters actually used)."""
    kw = model_kwargs(config)
    filters = kw["filters"]
    return build(config["architecture"], in_channels=in_channels, n_classes=n_classes, **kw), filters


# Importing the family modules registers them.
from . import residual  # noqa: E402,F401

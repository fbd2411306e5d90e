"""The ways to compress, one file each, registered by name in `METHODS` (the CLI's --method, the app).

Every method is driven by the Compressor (compressor.py) and answers the same hooks (base.py).
The training methods differ only in how they choose the allocation during their first phase:

* admm: the paper's method with the joint projection (projector.py); its setting: rho (AdmmConfig).
* uniform: one global density and one bitwidth for every layer (a baseline).
* sequential: prune first, choose bitwidths later (a baseline).

One method compresses without training: posttrain, from calibration inputs (`Compressor.calibrate`).
"""
from __future__ import annotations

from typing import Any

from .admm import Admm, AdmmConfig
from .base import Layers, Method, MethodConfig, ProgressCallback, never_back, part_of, snap
from .posttrain import PostTrain
from .sequential import Sequential
from .uniform import Uniform

METHODS: dict[str, type[Method]] = {"admm": Admm, "uniform": Uniform, "sequential": Sequential, "posttrain": PostTrain}


def make_method(name: str, layers: Layers, settings: dict[str, Any] | None = None) -> Method:
    """The method `name` on these layers, with its own `settings` (its Config's fields; defaults otherwise)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](layers, METHODS[name].settings(settings or {}))


__all__ = ["METHODS", "AdmmConfig", "Layers", "Method", "MethodConfig", "ProgressCallback", "make_method", "never_back", "part_of", "snap"]

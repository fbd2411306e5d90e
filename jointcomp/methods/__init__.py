"""The ways to compress, one file each, registered by name in `METHODS` (the CLI's --method, the app).

Every method is driven by the Compressor (compressor.py) and answers the same hooks (base.py).
The training methods differ only in how they choose the allocation during their first phase:

* admm: the paper's method with the joint projection (projector.py).
* uniform: one global density and one bitwidth for every layer (a baseline).
* sequential: prune first, choose bitwidths later (a baseline).

One method compresses without training: posttrain, from calibration inputs (`Compressor.calibrate`).
"""
from __future__ import annotations

from .admm import Admm
from .base import Layers, Method, snap
from .posttrain import PostTrain
from .sequential import Sequential
from .uniform import Uniform

METHODS: dict[str, type[Method]] = {"admm": Admm, "uniform": Uniform, "sequential": Sequential, "posttrain": PostTrain}


def make_method(name: str, layers: Layers) -> Method:
    """The method `name` on these layers."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](layers)


__all__ = ["METHODS", "Layers", "Method", "make_method", "snap"]

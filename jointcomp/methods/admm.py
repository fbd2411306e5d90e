"""admm: the paper's method, with one joint projection of pruning and quantization (projector.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..projector import Allocation
from ..budget import Budget
from .base import Layers, Method, MethodConfig, ProgressCallback


@dataclass
class AdmmConfig(MethodConfig):
    rho: float = 2.0  # the ADMM penalty: how hard the weights are pulled towards their projection

    def __post_init__(self) -> None:
        if not math.isfinite(self.rho) or self.rho <= 0:
            raise ValueError(f"rho must be a positive finite number, got {self.rho}")


class Admm(Method):
    """The paper's ADMM with one joint projection: W (the trained weights), V (their
    projection onto the budget) and U (the scaled dual variable) of every compressed layer."""

    Config = AdmmConfig
    config: AdmmConfig
    first_phase = "admm"
    measured_budgets = True

    def __init__(self, layers: Layers, config: AdmmConfig | None = None) -> None:
        super().__init__(layers, config)
        self.V = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.U = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    @torch.no_grad()
    def project(self, budget: Budget) -> tuple[float, float] | None:
        """V <- the joint projection of W + U; U <- U + W - V. Returns the
        two multipliers (pruning cut score, joint price of a bit), in squared error per bit.
        The first projection (step 0) chooses everything; each later one starts its k-means fits
        from the previous one's codebooks, as W + U moves little between projections."""
        x = [p.detach().float() + u for p, u in zip(self.params, self.U)]
        tables = self.projector.joint_tables(x, self.books)
        self.books = tables.books
        alloc = self.projector.joint(x, budget, tables)
        self.V = alloc.values
        for p, v, u in zip(self.params, self.V, self.U):
            u.add_(p.detach().float() - v)
        return alloc.lambda_prune, alloc.lambda_quant

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """The proximal step of the augmented term, W <- (W + lr rho (V - U)) / (1 + lr rho)."""
        if self.fixed is not None:
            return super().after_step(lr)
        a = lr * self.config.rho
        for p, v, u in zip(self.params, self.V, self.U):
            p.add_(v - u, alpha=a).div_(1 + a)

    def allocate(self, budget: Budget, progress: ProgressCallback | None = None) -> Allocation:
        """The model that would ship now: the joint projection of the trained weights (its fits
        started from the last projection's)."""
        weights = self.weights()
        return self.projector.joint(weights, budget, self.projector.shared_tables(weights, self.books))

    def density(self) -> torch.Tensor:
        """Kept fraction per layer of the last projection (what the file's positions will cost)."""
        return torch.tensor([float((v != 0).double().mean()) for v in self.V], dtype=torch.float64)

    @torch.no_grad()
    def residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer: primal residual ||W - V||^2 and dual norm ||U||."""
        r = torch.stack([(p.detach().float() - v).square().sum() for p, v in zip(self.params, self.V)])
        d = torch.stack([u.norm() for u in self.U])
        return r.cpu().double(), d.cpu().double()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "V": self.V, "U": self.U, "books": self.books}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.params[0].device
        self.V = [v.to(device) for v in state["V"]]
        self.U = [u.to(device) for u in state["U"]]
        self.books = None if state["books"] is None else state["books"].to(device)

"""When a compression run projects and when its phases start: one small pure object, so
the Compressor, the Engine and the tests read the same boundaries instead of recomputing them."""
from __future__ import annotations

from dataclasses import dataclass

PROJECTIONS_PER_EPOCH = 4  # the bench's choice (BENCHMARKS.md): more often than once per epoch helps at high ratios
DEFAULT_PROJECTIONS = 15 * PROJECTIONS_PER_EPOCH  # over a run whose epochs are unknown (a user's loop)


def every_for_epoch(steps_per_epoch: int) -> int:
    """The projection interval of a loop whose epoch length is known (the Engine's)."""
    return max(1, steps_per_epoch // PROJECTIONS_PER_EPOCH)


@dataclass(frozen=True)
class Schedule:
    """A run of `steps` optimizer steps: a projection every `every` steps while the
    allocation is chosen; masks and bitwidths fixed (retraining) for the `retrain` fraction
    before the last `finetune` fraction, which trains in the deployed shape. Phase
    boundaries fall on projection steps."""

    steps: int
    every: int
    retrain: float  # fractions of the steps, as CompressorConfig gives them
    finetune: float

    @classmethod
    def of(cls, steps: int, project_every: int, retrain: float, finetune: float) -> Schedule:
        """`project_every` 0: DEFAULT_PROJECTIONS over the whole run."""
        return cls(steps, project_every or max(1, steps // DEFAULT_PROJECTIONS), retrain, finetune)

    def projects(self, step: int) -> bool:
        """Whether `step` is a projection step."""
        return step % self.every == 0

    @property
    def retrain_start(self) -> int:
        """The step from which masks and bitwidths are fixed (retraining, then the final phase)."""
        return self._tail_start(self.retrain + self.finetune)

    @property
    def finetune_start(self) -> int:
        """The step at which the final phase (training in the deployed shape) starts."""
        return self._tail_start(self.finetune)

    def _tail_start(self, fraction: float) -> int:
        """The step that starts the last `fraction` of the run: a projection boundary, at
        least one interval in and one before the end; -1 when there is none (fraction 0)."""
        slots = -(-self.steps // self.every)
        intervals = min(slots - 1, max(1, round(fraction * slots)))
        if fraction == 0 or intervals < 1:
            return -1
        return (slots - intervals) * self.every

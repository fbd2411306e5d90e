"""A forward pass recorded, so that a pass after one weight changed computes only what it can reach.

Measuring how much a network's outputs move when one layer's weight changes (posttrain's
sensitivities) takes a forward pass per layer; everything that ended before the first module using
that weight began is the same as in the dense pass. `RecordedPass.record` runs the dense pass once
to learn its calls (every module's, nested as they were made) and once more keeping a copy of the
output of each call that can stand in for a later pass; `RecordedPass.answering_before(p)` then
lets the outermost calls that ended before `p`'s first use answer with those copies instead of
computing, bounded in bytes. A call answers only where that cannot change anything: its output a
tensor that is not one of its inputs, its inputs not changed in place by it. The outputs are the
same numbers as a pass computed whole (tests/test_posttrain.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Callable, Iterator

import torch
from torch import nn


@dataclasses.dataclass
class _Call:
    """One module's call in a recorded forward pass."""

    module: nn.Module
    parent: int | None  # the call it was made in (its index in the order calls began)
    answers: bool = False  # a copy of its output can stand in for it (`_effects_only_output`)
    output: torch.Tensor | None = None  # that copy, where kept


@dataclasses.dataclass
class RecordedPass:
    """The dense model's forward pass on one batch: its outputs and every module's call."""

    outputs: torch.Tensor
    calls: list[_Call]

    @classmethod
    @torch.no_grad()
    def record(cls, model: nn.Module, x: torch.Tensor, weights: list[nn.Parameter], bound: int) -> "RecordedPass":
        """`model` on `x`, twice: once to learn its calls, once keeping (up to `bound` bytes) the outputs
        of the calls that can stand in before the first use of each of `weights`."""
        learned = cls._run(model, x, set(), bound)
        wanted = {i for p in weights for i, _ in learned._stand_ins(learned._first_use(p), lambda c: c.answers)}
        kept = cls._run(model, x, wanted, bound)
        if [c.module for c in kept.calls] != [c.module for c in learned.calls]:  # the pass is not repeatable
            return learned
        return kept

    @classmethod
    def _run(cls, model: nn.Module, x: torch.Tensor, keep: set[int], bound: int) -> "RecordedPass":
        found = cls(torch.empty(0), [])
        open_calls: list[tuple[int, list[tuple[torch.Tensor, int]]]] = []
        room = [bound]

        def began(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            open_calls.append((len(found.calls), [(t, t._version) for t in inputs]))
            found.calls.append(_Call(module, open_calls[-2][0] if len(open_calls) > 1 else None))

        def ended(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            index, inputs = open_calls.pop()
            call = found.calls[index]
            call.answers = _effects_only_output(output, inputs)
            size = output.numel() * output.element_size() if call.answers else 0
            if index in keep and call.answers and size <= room[0]:
                room[0] -= size
                call.output = output.clone()  # a copy: what follows may change the output in place

        handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(began, with_kwargs=True),
                                                        m.register_forward_hook(ended, with_kwargs=True))]
        try:
            found.outputs = model(x)
        finally:
            for handle in handles:
                handle.remove()
        return found

    def _first_use(self, p: nn.Parameter) -> int:
        """The first call of a module that owns `p` (past the last call where none does)."""
        return next((i for i, c in enumerate(self.calls) if any(q is p for q in c.module.parameters(recurse=False))),
                    len(self.calls))

    def _stand_ins(self, first: int, can: Callable[[_Call], bool]) -> list[tuple[int, int]]:
        """The outermost calls that ended before call `first` began and `can` stand in for themselves,
        each with how many calls of its module a pass makes before it (those within a stand-in are not
        made at all)."""
        ancestors, a = set(), first if first < len(self.calls) else None
        while a is not None:
            ancestors.add(a)
            a = self.calls[a].parent
        inside, made, found = set(), {}, []
        for i, call in enumerate(self.calls[:first]):
            if call.parent in inside:
                inside.add(i)
                continue
            nth = made[call.module] = made.get(call.module, -1) + 1
            if i not in ancestors and can(call):
                found.append((i, nth))
                inside.add(i)
        return found

    @contextlib.contextmanager
    def answering_before(self, p: nn.Parameter) -> Iterator[None]:
        """Within: the model's outermost calls that ended before the first use of `p` give copies of their
        recorded outputs instead of computing (their inputs cannot have changed). A use is a call of a
        module that owns `p`, as posttrain takes its layers (Conv2d, Linear, Embedding): code that reads
        `p` itself before calling any of them (`F.linear(x, self.head.weight)` in a parent) is not seen."""
        answers: dict[nn.Module, dict[int, torch.Tensor]] = {}  # per module, by its n-th call in the pass
        for i, nth in self._stand_ins(self._first_use(p), lambda c: c.output is not None):
            answers.setdefault(self.calls[i].module, {})[nth] = self.calls[i].output
        before = {module: module.__dict__.get("forward") for module in answers}  # a forward set on the instance
        for module, outputs in answers.items():
            module.forward = _answering(module.forward, outputs)
        try:
            yield
        finally:
            for module, forward in before.items():
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward


def _effects_only_output(output, inputs: list[tuple[torch.Tensor, int]]) -> bool:
    """Whether a call's only effect is its output: a tensor that shares no memory with its inputs,
    which it left unchanged (their version counters as before)."""
    if not isinstance(output, torch.Tensor):
        return False
    storage = output.untyped_storage().data_ptr()
    return all(t._version == version and t.untyped_storage().data_ptr() != storage for t, version in inputs)


def _answering(forward: Callable, outputs: dict[int, torch.Tensor]) -> Callable:
    """A forward that gives a copy of `outputs[n]` for its n-th call where there is one, else computes."""
    calls = itertools.count()

    def answer(*args, **kwargs):
        found = outputs.get(next(calls))
        return forward(*args, **kwargs) if found is None else found.clone()
    return answer

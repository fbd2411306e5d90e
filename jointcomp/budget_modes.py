"""The budget modes, by name: what a target counts. One list, here, of the accountings defined
next to what they price."""
from __future__ import annotations

from .bops import BopsAccounting
from .budget import Accounting, MeasuredAccounting
from .codec import FileAccounting
from .deploy.c import FlashAccounting

BUDGET_MODES: dict[str, type[Accounting]] = {
    "paper": Accounting,  # bits x non-zeros, the paper's count
    "file": FileAccounting,  # the .jcz file's bytes
    "flash": FlashAccounting,  # the C export's const data
    "bops": BopsAccounting,  # bit-operations of one forward pass
}
MEASURED_MODES = tuple(name for name, mode in BUDGET_MODES.items() if issubclass(mode, MeasuredAccounting))  # need admm


def budget_modes_help() -> str:
    """One line naming every budget mode and what it counts (for --help and the app)."""
    return "; ".join(f"{name}: {mode.description}" for name, mode in BUDGET_MODES.items())


def format_amount(value: float, budget_mode: str) -> str:
    """A value of `budget_mode`'s accounting for people: a size ('12.5 KB') or bit-operations ('3.1 GBOPs')."""
    return BUDGET_MODES[budget_mode].format(value)

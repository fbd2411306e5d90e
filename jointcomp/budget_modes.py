"""The budget modes, by name: what a target counts. One list, here, of the accountings defined
next to what they price."""
from __future__ import annotations

from .budget import Accounting
from .codec import FileAccounting
from .deploy.c import FlashAccounting

BUDGET_MODES: dict[str, type[Accounting]] = {
    "paper": Accounting,  # bits x non-zeros, the paper's count
    "file": FileAccounting,  # the .jcz file's bytes
    "flash": FlashAccounting,  # the C export's const data
}


def budget_modes_help() -> str:
    """One line naming every budget mode and what it counts (for --help and the app)."""
    return "; ".join(f"{name}: {mode.description}" for name, mode in BUDGET_MODES.items())

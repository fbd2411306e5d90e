"""The command line's refusals, checked in process (`jointcomp.cli.main`: the code path of `python -m
jointcomp` without the 3 s start of a new Python and torch; a traceback would be an exception here)."""
from __future__ import annotations

from jointcomp.cli import main


def refused(capsys, *args) -> str:
    """The one line `jointcomp args` writes to stderr as it refuses them with exit code 2."""
    code = main([str(a) for a in args])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, (code, stderr)
    return stderr

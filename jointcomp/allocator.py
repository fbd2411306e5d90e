"""glibc's allocator set up for a process that computes on large tensors on the CPU.

By default glibc gives every freed block of 32 MB or more straight back to the operating system
(and trims the free top of its heap), so each forward pass on a few hundred images allocates its
activations afresh and page-faults on every 4 KB page of them. On two CPU cores a ResNet-20
forward pass on 512 CIFAR images took 0.6 s, and 0.15 s with freed blocks of up to 1 GiB kept
for reuse; a post-training what-if 19 s, and 12 s (BENCHMARKS.md). The command line and the app
call `keep_freed_blocks()` when they start. Importing jointcomp changes nothing: a library does
not set its host process's allocator; a script of one's own may call it too.
"""
from __future__ import annotations

import ctypes
import sys

KEPT_BYTES = 1 << 30  # freed blocks up to this size stay in the process for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_blocks(limit: int = KEPT_BYTES) -> bool:
    """Ask glibc to keep freed blocks of up to `limit` bytes for reuse instead of returning them to
    the operating system. True where it took (glibc on Linux); elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, limit) == 1 and mallopt(_M_TRIM_THRESHOLD, limit) == 1

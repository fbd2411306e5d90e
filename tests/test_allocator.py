"""The CLI's and the app's allocator setting (jointcomp.allocator): a large tensor freed and
allocated again reuses the pages it had, instead of page-faulting on every one anew."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

REFILL = """
import resource, sys, torch
from jointcomp.allocator import keep_freed_blocks
if sys.argv[1] == "kept":
    assert keep_freed_blocks()
torch.ones(64 << 20)  # 256 MB, allocated, filled and freed once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(64 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", REFILL, mode], capture_output=True, text=True, timeout=300, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    default, kept = page_faults("default"), page_faults("kept")
    assert default > 10 * (256 << 20) // 4096 // 2  # by default each 256 MB is mapped anew: a fault per 4 KB page
    assert kept < default / 4, (kept, default)  # kept: reused (the heap may grow once more on the way)

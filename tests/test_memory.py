"""PeakMemory on a CPU: the region's own peak resident set, through the kernel's counter where
Linux keeps one and through the sampler thread elsewhere."""

import time

import numpy as np
import pytest

import edgelmm.utils.memory as memory
from edgelmm.utils.memory import PeakMemory


@pytest.mark.parametrize("kernel", [True, False])
def test_a_region_reports_its_own_peak_not_an_earlier_one(monkeypatch, kernel):
    if kernel and not (memory._reset_peak_rss() and memory._peak_rss()):
        pytest.skip("this system keeps no resettable peak RSS (Linux /proc/self/clear_refs)")
    monkeypatch.setattr(memory, "_kernel", kernel)
    with PeakMemory("cpu") as big:
        block = np.ones(160 * 2**20 // 8)  # 160 MiB, touched
        if not kernel:  # let the sampler see it
            time.sleep(0.05)
        del block
    with PeakMemory("cpu") as small:
        pass
    assert big.bytes - small.bytes > 120 * 2**20
    with PeakMemory("cpu") as outer:  # a region inside another keeps the outer one's figure right
        with PeakMemory("cpu") as inner:
            pass
        block = np.ones(160 * 2**20 // 8)
        if not kernel:
            time.sleep(0.05)
        del block
    assert outer.bytes - inner.bytes > 120 * 2**20

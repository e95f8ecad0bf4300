"""Peak memory of a region: CUDA peak allocated on a GPU, the peak resident set size on a CPU."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:  # torch is imported lazily: engines that do not use it should not pay for it
    import torch

_regions = 0  # CPU regions open now (in any thread)
_kernel: bool | None = None  # whether the kernel's peak RSS can be reset and read here (probed once)
_lock = threading.Lock()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (Linux: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    """The kernel's peak RSS of this process since its last reset (VmHWM), bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes`.

    On CUDA this is torch's peak allocated memory (what the model and its activations hold).
    On a CPU it is the largest resident set size of the process during the region, which
    includes the weights and interpreter as a user's `top` would. On Linux the kernel keeps that
    peak: the region resets it at its start and reads it at its end, at no cost while it runs;
    a region that begins while another is open leaves the reset to that one (its figure is then
    the peak since the first began). Elsewhere a sampler thread reads the RSS every `interval_s`.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.005):
        self.device_type = str(device).split(":")[0]
        self.device = device
        self.interval_s = interval_s
        self.bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False

    def __enter__(self) -> PeakMemory:
        global _regions, _kernel
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        with _lock:
            if _regions == 0 and _kernel is not False:  # the first open region resets the peak
                reset = _reset_peak_rss()
                if _kernel is None:  # once: can this process reset and read its peak RSS?
                    _kernel = reset and _peak_rss() is not None
            self._kernel = bool(_kernel)
            _regions += 1
        if self._kernel:
            return self
        process = psutil.Process()
        self.bytes = process.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(self.interval_s):
                self.bytes = max(self.bytes or 0, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        global _regions
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        with _lock:
            _regions -= 1
        if self._kernel:
            self.bytes = _peak_rss()
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.bytes = max(self.bytes or 0, psutil.Process().memory_info().rss)

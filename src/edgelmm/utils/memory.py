"""Peak memory of a region: CUDA peak allocated on a GPU, sampled resident set size on a CPU."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:  # torch is imported lazily: engines that do not use it should not pay for it
    import torch


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes`.

    On CUDA this is torch's peak allocated memory (what the model and its activations hold).
    On a CPU it is the largest resident set size of the process seen by a sampler thread, which
    includes the weights and interpreter as a user's `top` would.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.005):
        self.device_type = str(device).split(":")[0]
        self.device = device
        self.interval_s = interval_s
        self.bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            process = psutil.Process()
            self.bytes = process.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(self.interval_s):
                    self.bytes = max(self.bytes or 0, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.bytes = max(self.bytes or 0, psutil.Process().memory_info().rss)

"""Peak memory of a block of work: CUDA allocator peak on GPU; on CPU the resident set sampled by a thread (Linux
/proc), since the CPU allocator keeps no peak counter."""

from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb``: the peak above the level at entry (None when the
    platform offers no way to measure it)."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.005):
        self.device, self.interval = torch.device(device), interval_s
        self.peak_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            if self._base is not None:
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss() or 0)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss() or 0)
            self.peak_mb = (self._peak - self._base) / 2**20

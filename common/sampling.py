"""Background samplers: call something every ``interval`` seconds while a ``with`` block runs.

:class:`TreeMemory` samples the memory of a process tree (a launch's SuperLink, ServerApp,
Ray and its workers); the benchmarks and the sweep runner use it.
"""

from __future__ import annotations

import threading
from typing import Self


class PeriodicSampler:
    """Calls :meth:`sample` every ``interval`` seconds until the block ends or it returns ``False``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set() and self.sample():
            self._stop.wait(self.interval)


class TreeMemory(PeriodicSampler):
    """Peaks of the summed RSS and PSS of a process and all its descendants, sampled.

    RSS counts shared pages (libtorch, mapped once per process) in every process, so its
    sum over-states; PSS splits each shared page between the processes that map it.

    Parameters
    ----------
    pid : int
        The root of the tree.
    interval : float
        Seconds between samples.
    include_root : bool
        Count the root process itself (False for a Ray worker that only waits on its children).
    """

    def __init__(self, pid: int, interval: float = 0.25, *, include_root: bool = True) -> None:
        super().__init__(interval)
        self.pid, self.include_root = pid, include_root
        self.peak, self.peak_pss = 0, 0

    def sample(self) -> bool:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)] if self.include_root else root.children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        total = pss = 0
        for p in procs:
            try:
                info = p.memory_full_info()
                total += info.rss
                pss += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.peak = max(self.peak, total)
        self.peak_pss = max(self.peak_pss, pss)
        return True

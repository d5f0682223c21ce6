"""A background thread that samples something every ``interval`` seconds while a ``with`` block runs."""

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

"""The run clock: all of a run's timing in one place, carried across resumes.

In the manner of big_vision's ``Chrono``: wall time since the run first
started, training time (steps only: the first, compiling step, evaluation and
checkpointing are left out), images trained, and the throughput of the last
window. :meth:`Chrono.as_meta` goes into every checkpoint's metadata and a
resumed run continues from it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Mapping, Optional


class Chrono:
    def __init__(self, saved: Optional[Mapping[str, float]] = None,
                 session_start: Optional[float] = None) -> None:
        saved = saved or {}
        self._wall_base = float(saved.get("wall_time_s", 0.0))
        self._train_base = float(saved.get("train_time_s", 0.0))
        self._images_base = int(saved.get("train_images", 0))
        self._session_start = time.time() if session_start is None else session_start
        self._train_time = 0.0
        self._images = 0
        self._running_since: Optional[float] = None  # None: the training clock is stopped
        self._window_start, self._window_images, self._window_steps = time.time(), 0, 0

    def start(self) -> None:
        """Start the training clock (after the first step, whose time is compilation)."""
        self._running_since = time.time()
        self._reset_window()

    @property
    def running(self) -> bool:
        return self._running_since is not None

    def step(self, images: int) -> None:
        """One training step of ``images`` images has been dispatched."""
        if self.running:
            self._images += images
            self._window_images += images
            self._window_steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpointing) is not training time."""
        was_running = self.running
        if was_running:
            self._train_time += time.time() - self._running_since
            self._running_since = None
        try:
            yield
        finally:
            if was_running:
                self.start()

    def window(self) -> tuple[float, float]:
        """(images/s, steps/s) since the last call, evaluation or checkpoint; NaN if none."""
        elapsed = time.time() - self._window_start
        ips = self._window_images / elapsed if elapsed > 0 and self._window_images else float("nan")
        sps = self._window_steps / elapsed if elapsed > 0 and self._window_steps else float("nan")
        self._reset_window()
        return ips, sps

    def _reset_window(self) -> None:
        self._window_start, self._window_images, self._window_steps = time.time(), 0, 0

    @property
    def wall_time_s(self) -> float:
        return self._wall_base + time.time() - self._session_start

    @property
    def train_time_s(self) -> float:
        running = time.time() - self._running_since if self.running else 0.0
        return self._train_base + self._train_time + running

    @property
    def train_images(self) -> int:
        return self._images_base + self._images

    @property
    def images_per_sec(self) -> float:
        t = self.train_time_s
        return self.train_images / t if t > 0 and self.train_images else float("nan")

    def as_meta(self) -> dict[str, float]:
        return {"wall_time_s": self.wall_time_s, "train_time_s": self.train_time_s,
                "train_images": self.train_images}

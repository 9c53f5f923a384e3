"""Stop signals: SIGTERM, SIGINT (Ctrl-C) and SIGHUP all take one path.

The first one sets a flag that the training loop polls: it finishes the
current step, saves a checkpoint, says where and how to resume, and the
process exits ``128 + signal``. Long pruning (streamed scoring, many rounds)
polls it too, between batches and rounds, and raises :class:`Stopped`: there
is nothing to save before the first step, so the run exits ``128 + signal``
at once and a rerun prunes again. A second signal exits at once
(``os._exit``): orbax renames a checkpoint into place only once it is
complete, so the newest finished checkpoint is never damaged by it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any, Callable, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(Exception):
    """A stop signal ended work that has nothing to save yet; the message says where."""


class StopSignals:
    """A context manager; ``signum`` is the first stop signal received, or None."""

    SAVING = "finishing the current step and saving a checkpoint"

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._response = self.SAVING  # what the first signal will do, as told to the user

    def __enter__(self) -> "StopSignals":
        for s in STOP_SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def response(self) -> str:
        """What a first signal is answered with now."""
        return self._response

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum) if self.signum else 0

    @contextlib.contextmanager
    def responding(self, response: str) -> Iterator[None]:
        """Within the block a first signal is answered with ``response`` (what will happen)."""
        before, self._response = self._response, response
        try:
            yield
        finally:
            self._response = before

    @contextlib.contextmanager
    def polled(self, response: str, agree: Callable[[bool], bool] = bool
               ) -> Iterator[Callable[[], bool]]:
        """``() -> bool`` for work that polls for a stop (long pruning), within the block.

        Polling is what makes the promise: from its first call on, a first signal is
        answered with ``response`` (what the poller will do), so work that never polls
        leaves the answer as it was. ``agree`` turns this process's flag into the run's
        (a collective with several processes: call the poller at the same points on each).
        """
        before = self._response

        def requested() -> bool:
            self._response = response
            if agree(self.signum is not None):
                self.stop_with_others()
                return True
            return False

        try:
            yield requested
        finally:
            self._response = before

    def stop_with_others(self) -> None:
        """Another process of the run was signalled: stop as if this one had had SIGTERM
        (the signal of a preemption), unless it has its own."""
        if self.signum is None:
            self.signum = signal.SIGTERM

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            print(f"\n{signal.Signals(signum).name} again: exiting now; the newest finished "
                  "checkpoint is intact, rerun the same command to resume from it",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: {self._response} (send it again to exit at "
              "once)", file=sys.stderr, flush=True)

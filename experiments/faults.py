"""One line per fault on the console; the details in the workdir's errors log.

Every way a run can fail ends in one ``error: ...`` line on stderr naming the
cause (and the file, where there is one), and an exit status: 1 for an error
during the run, 2 for a refusal. The full traceback goes to
``<workdir>/errors.log`` (a local workdir), and to the console as well when
the environment variable ``GRASP_JAX_DEBUG=1`` is set.

While a run trains, the libraries' own reports of a failure in their
background threads (orbax's absl ``ERROR`` records, tensorstore's tracebacks
from its threads, asyncio's) go to the errors log too: one full disk used to
print ~550 lines and ~20 tracebacks before the run stopped.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Iterator, Optional

from experiments import paths

DEBUG_ENV = "GRASP_JAX_DEBUG"
ERRORS_LOG = "errors.log"
LIBRARY_LOGGERS = ("absl", "orbax", "asyncio")


def debug() -> bool:
    """Whether ``GRASP_JAX_DEBUG`` asks for full tracebacks on the console."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def errors_log(workdir: Optional[str]) -> Optional[str]:
    """The errors log of a local workdir that exists (None otherwise: no file is created
    to hold an error about the workdir itself)."""
    if not workdir or paths.is_url(workdir) or not os.path.isdir(workdir):
        return None
    return os.path.join(workdir, ERRORS_LOG)


def append(log_path: Optional[str], title: str, text: str) -> bool:
    """Append a dated section to ``log_path``; False if there is none or it cannot be written."""
    if not log_path or not text.strip():
        return False
    existed = os.path.exists(log_path)
    try:
        with open(log_path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n{text.rstrip()}\n")
    except OSError:
        # A full or read-only disk: the console line is all there is; no empty log stays.
        if not existed:
            with contextlib.suppress(OSError):
                if os.path.getsize(log_path) == 0:
                    os.remove(log_path)
        return False
    return True


def traceback_text(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception behind it) is "no space left on device"
    (an OSError, or orbax/tensorstore's RESOURCE_EXHAUSTED naming errno 28)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(x)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
    return False


def describe(e: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def report(message: str, e: Optional[BaseException] = None, workdir: Optional[str] = None,
           process: str = "") -> None:
    """Print ``error: message`` in one line; the traceback to the errors log and, with
    ``GRASP_JAX_DEBUG=1``, to the console."""
    line = f"error{process}: {message}"
    if e is not None:
        log_path = errors_log(workdir)
        if append(log_path, message.splitlines()[0], traceback_text(e)):
            line += f" (traceback in {log_path})"
        if debug():
            print(traceback_text(e), file=sys.stderr, end="", flush=True)
        elif not log_path:
            line += f" (set {DEBUG_ENV}=1 for the traceback)"
    print(line, file=sys.stderr, flush=True)


class _ThreadRoutedStderr(io.TextIOBase):
    """sys.stderr for a run: the main thread's writes go to the console, other threads'
    (tensorstore and orbax reporting a failed background write) to the errors log."""

    def __init__(self, console: Any, log_path: Optional[str]) -> None:
        self.console, self.log_path = console, log_path
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread() or debug():
            return self.console.write(text)
        with self._lock:
            if self.log_path:
                try:
                    with open(self.log_path, "a") as f:
                        f.write(text)
                except OSError:
                    pass
        return len(text)

    def flush(self) -> None:
        self.console.flush()

    def fileno(self) -> int:
        return self.console.fileno()

    def isatty(self) -> bool:
        return self.console.isatty()


@contextlib.contextmanager
def library_reports_to_log(workdir: str) -> Iterator[None]:
    """While a run trains: the libraries' errors and their threads' tracebacks go to the
    errors log, not the console (all of it to the console with ``GRASP_JAX_DEBUG=1``)."""
    log_path = errors_log(workdir)
    if debug() or log_path is None:
        yield
        return
    handler = logging.FileHandler(log_path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s:%(name)s:%(message)s"))
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg, lg.propagate, list(lg.handlers)) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    hooks = (threading.excepthook, sys.stderr)

    def on_thread(args: Any) -> None:
        append(log_path, f"exception in thread {getattr(args.thread, 'name', '?')}",
               "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                  args.exc_traceback)))

    threading.excepthook, sys.stderr = on_thread, _ThreadRoutedStderr(sys.stderr, log_path)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        # After a failure the libraries' threads may go on reporting until the process
        # exits: their stderr stays routed to the log (the main thread's still prints).
        threading.excepthook = hooks[0]
        if not failed:
            sys.stderr = hooks[1]
        for lg, propagate, handlers in saved:
            lg.propagate, lg.handlers = propagate, handlers
        handler.close()

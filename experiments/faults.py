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

A disk that fills mid-run is also the errors log's disk. So that its report
still has room, a run holds space for the log from its start
(:data:`LOG_RESERVE_BYTES`, allocated to an unnamed file that becomes the log
on its first write, or beyond the end of an existing log), and a write to the
log that fails anyway is dropped, never reported on the console: the console's
one line is the report that always gets through.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import errno
import functools
import io
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Optional

from experiments import paths

DEBUG_ENV = "GRASP_JAX_DEBUG"
ERRORS_LOG = "errors.log"
LIBRARY_LOGGERS = ("absl", "orbax", "asyncio")
# Room held for the errors log while a run trains. A disk that fills mid-run wrote 34-48 kB
# of library reports and tracebacks into it (a LeNet-5 run; bigger networks fail in more
# array writes, each with its traceback); writes past the reserve are dropped.
LOG_RESERVE_BYTES = 256 * 1024


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
    if not _write_log(log_path,
                      f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n{text.rstrip()}\n"):
        # A full or read-only disk: the console line is all there is; no empty log stays.
        if not existed:
            with contextlib.suppress(OSError):
                if os.path.getsize(log_path) == 0:
                    os.remove(log_path)
        return False
    return True


# --------------------------------------------------------------------------
# Space held for the errors log.

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_log_lock = threading.RLock()  # one writer at a time: the main thread's and libraries' threads'


@functools.lru_cache(maxsize=None)
def _libc_fallocate() -> Optional[Callable[..., int]]:
    """Linux's ``fallocate(fd, mode, offset, len)`` (Python's os has only posix_fallocate,
    which grows the file: no ``FALLOC_FL_KEEP_SIZE``); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for name in ("fallocate64", "fallocate"):  # the 64-bit offset entry where there is one
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            return fn
    return None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    fn = _libc_fallocate()
    return fn is not None and fn(fd, mode, offset, length) == 0


@dataclasses.dataclass
class _Reserve:
    """Blocks allocated for the log to grow into: ``[.., end)`` of the file open as ``fd``,
    an unnamed file in the log's directory until :func:`_claim` names it the log, or the
    log itself (``named``). Blocks allocated with ``FALLOC_FL_KEEP_SIZE`` leave the file's
    size as it is and are written into without allocating again, whatever the disk holds."""

    log_path: str
    fd: int
    end: int
    named: bool


_reserves: dict[str, _Reserve] = {}


def _reserve(log_path: str, nbytes: int) -> Optional[_Reserve]:
    """Allocate ``nbytes`` for ``log_path`` to grow into; None where the file system or the
    platform cannot (no ``O_TMPFILE`` or ``fallocate``, or no room left already)."""
    try:
        if os.path.exists(log_path):
            fd, named = os.open(log_path, os.O_WRONLY), True
        else:
            # Unnamed, so that a run that meets no error leaves no file, and a killed one
            # leaves nothing behind either (the kernel frees it with the last descriptor).
            fd, named = os.open(os.path.dirname(log_path), os.O_TMPFILE | os.O_WRONLY,
                                0o666), False
    except (OSError, AttributeError):  # AttributeError: no os.O_TMPFILE on this platform
        return None
    start = os.fstat(fd).st_size
    if not _fallocate(fd, _FALLOC_FL_KEEP_SIZE, start, nbytes):
        os.close(fd)
        return None
    return _Reserve(log_path, fd, start + nbytes, named)


def _claim(r: _Reserve) -> None:
    """Make the reserved blocks the log's before its first write: link the unnamed file
    into place (the log must not exist yet; if another process of the run made it
    meanwhile, the space moves to the end of that one)."""
    if r.named:
        return
    r.named = True
    try:
        directory = os.open(os.path.dirname(r.log_path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            # Through /proc with the link followed (os.link follows it only when given a
            # directory descriptor): the documented way to name an O_TMPFILE file.
            os.link(f"/proc/self/fd/{r.fd}", os.path.basename(r.log_path),
                    dst_dir_fd=directory)
        finally:
            os.close(directory)
    except OSError:
        os.close(r.fd)
        moved = _reserve(r.log_path, r.end)  # an unnamed file's reservation starts at 0
        r.fd, r.end = (moved.fd, moved.end) if moved else (-1, 0)


def _release(log_path: str) -> None:
    """Give back what the log did not use (the unused tail, or the unnamed file)."""
    with _log_lock:
        r = _reserves.pop(log_path, None)
        if r is None or r.fd < 0:
            return
        with contextlib.suppress(OSError):
            size = os.fstat(r.fd).st_size
            if r.named and size < r.end:
                _fallocate(r.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, size,
                           r.end - size)
        os.close(r.fd)


@atexit.register
def _release_all() -> None:
    for log_path in list(_reserves):
        _release(log_path)


def _write_log(log_path: str, text: str) -> bool:
    """Append ``text`` to the log, into its reserved space where it has some; False if it
    could not be written (whole)."""
    with _log_lock:
        r = _reserves.get(log_path)
        if r is not None:
            _claim(r)
        try:
            with open(log_path, "a") as f:
                f.write(text)
        except OSError:
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
        if log_path:
            _release(log_path)  # the run's last word: what the log did not use goes back
        if debug():
            print(traceback_text(e), file=sys.stderr, end="", flush=True)
        elif not log_path:
            line += f" (set {DEBUG_ENV}=1 for the traceback)"
    print(line, file=sys.stderr, flush=True)


class _ToErrorsLog(logging.Handler):
    """The libraries' log records, formatted, appended to the errors log.

    A record that cannot be written is dropped: ``logging.Handler.handleError`` would
    print "--- Logging error ---" and the traceback of the record (orbax's failed save)
    on the console, from the main thread when orbax logs while the run waits for a save.
    A full disk does that to the errors log's own writes.
    """

    def __init__(self, log_path: str) -> None:
        super().__init__()
        self.log_path = log_path
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s:%(name)s:%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a record whose arguments do not format
            text = f"{record.levelname}:{record.name}: {record.msg!r} {record.args!r}"
        _write_log(self.log_path, text + "\n")

    def handleError(self, record: logging.LogRecord) -> None:
        pass  # never the console: see the class's docstring


class _ThreadRoutedStderr(io.TextIOBase):
    """sys.stderr for a run: the main thread's writes go to the console, other threads'
    (tensorstore and orbax reporting a failed background write) to the errors log."""

    def __init__(self, console: Any, log_path: Optional[str]) -> None:
        self.console, self.log_path = console, log_path

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread() or debug():
            return self.console.write(text)
        if self.log_path:
            _write_log(self.log_path, text)
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
    errors log, not the console (all of it to the console with ``GRASP_JAX_DEBUG=1``);
    the log has :data:`LOG_RESERVE_BYTES` held for it meanwhile, and after a failure
    until the process exits (the failure's own report comes after this block)."""
    log_path = errors_log(workdir)
    if log_path is None:
        yield
        return
    with _log_lock:
        _release(log_path)  # one left by an earlier failed run in this process
        reserve = _reserve(log_path, LOG_RESERVE_BYTES)
        if reserve is not None:
            _reserves[log_path] = reserve
    failed = False
    try:
        with contextlib.nullcontext() if debug() else _routed_to(log_path):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        if not failed:
            _release(log_path)


@contextlib.contextmanager
def _routed_to(log_path: str) -> Iterator[None]:
    handler = _ToErrorsLog(log_path)
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

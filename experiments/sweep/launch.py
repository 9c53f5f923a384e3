"""``python -m experiments.sweep.launch PARENT_PID PROGRAM [ARG...]``: become PROGRAM
(``execv``), killed by the kernel the moment the sweep that started it dies.

Why: a cell must not outlive its sweep. SIGINT/SIGTERM to the sweep reach
the cell through the sweep's own handler (experiments.sweep.runner), but
SIGKILL of the sweep process alone runs no handler: the cell used to go on,
re-parented, writing into a workdir that the next invocation would resume.
Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) is armed here, in
the child, and survives ``execv``; it is set in this tiny launcher rather
than in a ``preexec_fn`` because the sweep process has threads (JAX's, once
it has checked the flags), and Python code between ``fork`` and ``exec`` of a
threaded process can deadlock (and sets off JAX's fork warning).

SIGKILL rather than SIGTERM: the runner resumes bit-exactly after SIGKILL,
and a SIGTERM'd cell would keep writing while it saves, perhaps beside the
next invocation's run of the same cell. Where ``prctl`` does not exist (not
Linux), PROGRAM runs without the guard.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(signum: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``signum`` to this process when its parent exits; False where
    that cannot be arranged (no ``prctl``)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m experiments.sweep.launch PARENT_PID PROGRAM [ARG...]",
              file=sys.stderr)
        return 2
    parent, program = int(argv[0]), list(argv[1:])
    die_with_parent()
    if os.getppid() != parent:
        # The sweep died before the signal was armed: nobody would stop this cell.
        return 1
    os.execv(program[0], program)
    return 1  # not reached: execv returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

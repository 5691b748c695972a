"""Child processes that do not outlive their parent (`run-local`'s tritonserver, mock, gateway and
Prometheus): a parent killed with SIGKILL runs no cleanup, and an orphaned tritonserver kept its
gRPC port, so the next `make run` failed on Triton's bind error. Linux's PR_SET_PDEATHSIG has the
kernel signal the child when its parent dies, whatever killed it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when this process dies (it
    survives `exec`). None off Linux, and off the main thread: the kernel sends the signal when
    the *thread* that forked exits, which would stop a child started from a short-lived thread."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, called after it
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl ran: nobody would signal us
            os.kill(os.getpid(), sig)

    return preexec

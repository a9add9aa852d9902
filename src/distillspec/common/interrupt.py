"""Ctrl-C as a request: long jobs finish their current unit of work, save, then stop."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interruptible(what: str = "stopping after this step") -> Iterator[threading.Event]:
    """Inside, the first Ctrl-C sets the yielded event (the job checks it between units of
    work); a second Ctrl-C raises KeyboardInterrupt at once. Off the main thread it only
    yields an event nobody sets."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        print(f"\ndistillspec: {what} (Ctrl-C again to abort now) ...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)

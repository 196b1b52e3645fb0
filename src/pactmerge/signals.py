"""SIGINT/SIGTERM: unwind and clean up instead of dying mid-write.

The CLI runs a command inside :func:`exit_on_signals`: the first SIGINT or SIGTERM raises
:class:`Interrupted` (a ``BaseException``, like ``KeyboardInterrupt``) wherever the program is,
so the output's temporary folder is removed by the same ``except BaseException`` path as any
failure; further signals while that cleanup runs are ignored. The CLI then exits with
``128 + signal number`` (130 for SIGINT, 143 for SIGTERM).

The final rename that publishes an output runs inside :func:`deferred_signals`: a signal arriving
then is held until the rename is done, so an output is either absent or complete.

SIGKILL cannot be caught: it leaves the temporary folder (``.<name>.tmp-<host>-<pid>-<random>``)
beside the target. It is safe to delete, and the next write to the same target deletes those of
processes that are no longer running (:func:`pactmerge.io.output_guard.reap_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A SIGINT/SIGTERM turned into an exception by :func:`exit_on_signals`.

    ``output_complete`` is set when the signal arrived during the final rename: the output was
    then published whole before the exception was raised.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.output_complete: Path | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into :class:`Interrupted`; ignore later ones until the block ends."""
    if not _in_main_thread():  # signal handlers can only be set from the main thread
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:
            return  # already unwinding: let the cleanup finish
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in HANDLED}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during the block, then deliver them to the handlers in place before it."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in HANDLED}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)

"""Preemption: SIGTERM/SIGINT end a run at a step boundary every rank agrees on.

On SIGTERM (what Slurm sends at a time limit) or SIGINT, a rank only notes the signal and
finishes its step. After every step the ranks agree with one allreduce of a flag
(swa_lib.loop), so a signal that reached one rank stops them all at the same step boundary,
with no rank left waiting in a collective. They write a checkpoint of that step (with the
position inside the epoch and the epoch's running sums) and `fit` raises `Preempted`; the entry
point exits with PREEMPTED_EXIT_CODE. Running the same command again resumes at that step,
skipping the batches already trained, and ends bitwise equal to a run that never stopped
(tests/test_preemption.py). A second signal of the same kind ends the process at once.
"""
from __future__ import annotations

import os
import signal
import threading

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": what a
# preempted run is. Schedulers and job scripts can requeue on it (e.g. Slurm's --requeue
# logic in a wrapper) and treat every other non-zero code as a real failure.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """A SIGTERM/SIGINT stopped the run at a step boundary agreed by every rank; the message says where."""


class StopSignals:
    """Notes SIGTERM and SIGINT instead of dying, while active (a context manager, main thread only).

    The first signal is only recorded (`received`), so the current step finishes; a second
    one of the same kind restores the default action and ends the process at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, rank: int):
        self.rank = rank
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signum:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signum
        # os.write, not print: a handler may interrupt a print of the main thread.
        os.write(2, f"rank {self.rank}: {signal.Signals(signum).name} received; stopping at the next step "
                    f"boundary with a checkpoint (send it again to stop at once)\n".encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}



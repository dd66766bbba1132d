"""SIGTERM and SIGINT as a request to save a checkpoint at the next step boundary and stop.

Clusters preempt with SIGTERM (SLURM, Kubernetes, spot instances) and give a grace period; a user stops a run
with Ctrl-C. Either way, the work since the last checkpoint is lost unless the run saves before it goes, and a
save in the middle of a step (half the micro-batches accumulated) would not resume exactly. So the handler only
records the signal; the loop finishes the step it is in, saves, and exits with a message.

Every rank of a job must stop at the same step (a checkpoint holds every rank's partition). The loop therefore
adds the local flag to the all-reduce it already does at the start of each step (the loss normaliser), so the
ranks agree without one more collective: a signal that reaches any rank stops all of them after that step.

The same signal often arrives twice within milliseconds: once from the terminal or scheduler to the whole
process group, once forwarded by ``dlm launch`` to its workers. Repeats within :data:`REPEAT_WINDOW_S` are
that one request; a later one stops at once, as the signal's default action would (Ctrl-C twice to abandon
the save).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 1.0


class StopRequest:
    """While active, turns the stop signals into a flag the training loop reads at step boundaries.

    Handlers can only be installed in the main thread of the main interpreter; elsewhere (Ray Train runs the
    loop in a worker thread) this is inert and the launcher's own restart-from-checkpoint applies.
    """

    def __init__(self, enabled: bool = True, signals: Iterable[int] = STOP_SIGNALS) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if self.enabled:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            print(
                f"dlm: {signal.Signals(signum).name} received: saving a checkpoint at the end of this step, then "
                f"stopping (send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return  # the same request delivered twice (process group and launcher)
        self.__exit__()
        signal.raise_signal(signum)  # the previous handler now decides: KeyboardInterrupt or termination


def forward_signals(pids: Any, signals: Iterable[int] = STOP_SIGNALS) -> dict[int, Any]:
    """Install handlers that pass each stop signal on to the processes ``pids()`` names (``dlm launch``'s
    workers), so a SIGTERM sent to the launcher alone reaches every rank. Returns the previous handlers."""

    def handle(signum: int, frame: FrameType | None) -> None:
        for pid in pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handle) for signum in signals}

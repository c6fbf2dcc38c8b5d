"""StopSignals: SIGINT / SIGTERM / SIGUSR1 turn into a stop request instead of a dead process.

`run_job` installs them before it takes the shard lock and restores the previous handlers
only after it has released the lock, so a stop that arrives while a run starts or tears
down (committing, writing its summary, removing the lock) can never kill the process and
leave the lock behind. A second Ctrl-C after a stop exits at once (committed parts are safe).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

from batchgen.job.exit_codes import EXIT_INTERRUPTED

_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


class StopSignals:
    """While installed (`with StopSignals() as stop:`), a stop signal sets `stop.reason`."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._old_handlers: dict[int, Any] = {}

    def request(self, reason: str) -> None:
        """Ask for a stop from inside the run (e.g. "lock lost"); the first reason wins."""
        if self.reason is None:
            self.reason = reason

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in _STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _on_signal(self, signum: int, _frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            os.write(2, b"\nbatchgen: interrupted again, exiting now (committed parts are safe)\n")
            os._exit(EXIT_INTERRUPTED)  # "resume me": committed parts are kept
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            os.write(2, f"\nbatchgen: {self.reason}: committing complete parts, then "
                        "exiting (Ctrl-C again to exit at once)\n".encode())

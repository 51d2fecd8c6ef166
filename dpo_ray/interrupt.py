"""Graceful stop: Ctrl-C or SIGTERM on the driver asks the workers to checkpoint and stop.

The driver's signal handler writes a flag into Ray's internal key-value store (the same store Ray Train
uses for its own coordination, reachable from every node). Workers poll it between steps, agree through
an all-reduce, save a checkpoint, report and leave the loop. Running the same command again resumes
from that checkpoint. A second signal stops at once, the usual escape hatch.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

_NAMESPACE = "dpo_ray"


def _key(run_name: str) -> bytes:
    return f"stop:{run_name}".encode()


def request_stop(run_name: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_key(run_name), b"1", overwrite=True, namespace=_NAMESPACE)


def clear_stop(run_name: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_initialized

    if _internal_kv_initialized():
        _internal_kv_del(_key(run_name), namespace=_NAMESPACE)


def is_stop_requested(run_name: str) -> bool:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(_key(run_name), namespace=_NAMESPACE) is not None


class StopPoller:
    """Checks the stop flag at most once per ``interval_s`` (a key-value lookup per step is wasteful)."""

    def __init__(self, run_name: str, interval_s: float = 1.0):
        self.run_name = run_name
        self.interval_s = interval_s
        self._last = 0.0
        self._seen = False

    def poll(self) -> bool:
        now = time.monotonic()
        if not self._seen and now - self._last >= self.interval_s:
            self._last = now
            self._seen = is_stop_requested(self.run_name)
        return self._seen


class GracefulStop:
    """Context manager for the driver: the first SIGINT/SIGTERM requests a checkpointed stop."""

    def __init__(self, run_names: list[str]):
        self.run_names = run_names
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self.signum = signum
        print(
            f"\n[dpo-ray] {signal.Signals(signum).name}: saving a checkpoint and stopping after the current step; "
            "run the same command again to resume (signal again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        for name in self.run_names:
            request_stop(name)

    def __enter__(self) -> "GracefulStop":
        for name in self.run_names:
            clear_stop(name)
        if threading.current_thread() is threading.main_thread():  # e.g. not inside a Tune trial thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        for name in self.run_names:
            clear_stop(name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0

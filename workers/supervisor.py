"""``beaver up``'s embedded worker: started, restarted when it dies, stopped with ``beaver up``.

Stopping is SIGTERM (Celery's warm shutdown: the worker stops its running job's processes within
``BEAVER_CANCEL_GRACE_SECONDS`` and leaves the job to be re-queued), then SIGKILL if it is still
there. The worker also watches ``beaver up``'s pid (``BEAVER_SUPERVISOR_PID``), so it stops even when
``beaver up`` was killed outright.

While the worker is down nothing else would notice its jobs went silent, so ``beaver up`` also
runs a reaper (``workers.reaper``): the running job of a killed worker is re-queued once its
heartbeat expires, and the restarted worker runs it again (or it fails with ``worker_lost`` once
its attempts are spent).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

log = logging.getLogger("beaver.supervisor")


class WorkerSupervisor:
    """Runs ``command`` in its own process group and restarts it when it exits, waiting
    1, 2, 4 … up to ``max_backoff`` seconds between restarts (back to 1 s after a minute up)."""

    def __init__(self, command: list[str], max_backoff: float = 30.0, on_start=None):
        self.command, self.max_backoff, self.on_start = command, max_backoff, on_start
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="beaver-supervisor")

    def start(self) -> WorkerSupervisor:
        from workers.reaper import start_reaper_thread

        self._spawn()
        self._thread.start()
        start_reaper_thread(stop=self._stop)
        return self

    def _spawn(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self.proc = subprocess.Popen(self.command, start_new_session=True,
                                         env={**os.environ, "BEAVER_SUPERVISOR_PID": str(os.getpid())})
            self.started_at = time.time()
        if self.on_start:
            self.on_start(self.proc.pid)

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stop.wait(0.5):
            code = self.proc.poll()
            if code is None:
                if time.time() - self.started_at > 60:
                    backoff = 1.0
                continue
            log.warning("worker (pid %d) exited with %s; restarting it in %.0f s", self.proc.pid, code, backoff)
            _kill_group(self.proc.pid, signal.SIGKILL)  # whatever the dead worker left behind (pool children)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff)
            self._spawn()

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching, then SIGTERM the worker (a warm shutdown), SIGKILL after ``timeout`` (default:
        the cancel grace its job's processes get, and 15 s to stop them and leave)."""
        if timeout is None:
            from api.settings import get_settings

            timeout = get_settings().cancel_grace_seconds + 15
        with self._lock:
            self._stop.set()
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass

"""Worker processes behind one port: the parent side of ``runner.py serve --workers N``.

The parent binds the listening socket once and starts ``N`` worker processes (``spawn``,
so each one imports the app afresh: its own event loop, database pool, Redis client and
turn models). The kernel hands each new connection to whichever worker accepts it first.
The parent:

* forwards SIGTERM (and SIGINT) to the workers as SIGTERM: each one drains (see
  ``api/drain.py``) and exits; a second SIGINT makes them stop at once;
* restarts a worker that dies after it became ready (a crash, the OOM killer), and
  stops everything with exit code 1 when one dies before it ever became ready (a
  startup error would only repeat);
* keeps prometheus-client's multiprocess directory: each worker writes its samples
  there, ``GET /metrics`` on any worker merges them, and a dead worker's live gauges
  are dropped (:func:`prometheus_client.multiprocess.mark_process_dead`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

#: A worker process's entry point: ``target(sock, ready_event, index)``; module level, so
#: it can be pickled for ``spawn``.
WorkerTarget = Callable[[socket.socket, Any, int], None]

#: Seconds between restarts of a worker that keeps dying.
RESTART_DELAY_SECS = 1.0


def available_cpus() -> int:
    """CPU cores this process may use: its CPU affinity, capped by a cgroup CPU quota
    (a container's ``--cpus`` or a Kubernetes CPU limit), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def freeze_startup_heap() -> int:
    """Take what a worker holds after start-up out of the cyclic garbage collector's way.

    A started worker holds about 200,000 objects that live as long as it does (Pipecat,
    ONNX Runtime, FastAPI, the turn models' wrappers). Every full collection walks all of
    them: about 130 ms on the 2-core development machine, during which the event loop, and
    every call on it, stands still (a late reply or a gap in the bot's audio). Collected
    once and frozen (:func:`gc.freeze`), they are skipped; what calls allocate afterwards is
    collected as usual.

    Returns:
        How many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max`` or v1 CFS quota); ``None``: no limit."""
    with contextlib.suppress(OSError, ValueError, IndexError, ZeroDivisionError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        cpus = int(quota) / int(period)
        return cpus if cpus > 0 else None
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    return None


@contextlib.contextmanager
def metrics_dir() -> Iterator[str]:
    """prometheus-client's multiprocess directory for the workers, set in the environment
    (``PROMETHEUS_MULTIPROC_DIR``) before any worker starts.

    A directory given in the environment is emptied of the last run's files (the
    client's documented requirement); otherwise a temporary one is made and removed
    on exit.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):
            old.unlink(missing_ok=True)
        yield str(path)
        return
    path = Path(tempfile.mkdtemp(prefix="voice-agent-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    try:
        yield str(path)
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(path, ignore_errors=True)


#: glibc malloc arenas per worker process (``MALLOC_ARENA_MAX``) unless the environment
#: sets its own. glibc gives threads that allocate their own arena, up to 8 per core, and
#: keeps what each arena once held: a worker's threads (ONNX inference, ``to_thread``
#: calls, the Deepgram and OpenAI clients) made its memory grow by 12.7 MB per added call
#: in ``benchmarks/capacity.py``; with 2 arenas, 5.6 MB, at the same CPU per call.
WORKER_MALLOC_ARENAS = 2

#: Threads of the native math libraries per worker process (``OPENBLAS_NUM_THREADS``,
#: ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) unless the environment sets its own. A worker
#: is one core's worth of Python and ``serve`` runs one per core. NumPy's OpenBLAS starts
#: a thread per core, and after each matrix product (smart-turn's log-mel features) those
#: threads spin on the other cores, waiting for more work, while the ONNX model runs:
#: smart-turn cost 100 ms of CPU per turn end instead of 51 ms, time taken from the other
#: workers' calls.
WORKER_NATIVE_THREADS = 1
_NATIVE_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class _Worker:
    index: int
    process: Any
    ready: Any
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """Runs ``count`` worker processes on one listening socket until told to stop.

    Args:
        count: Number of worker processes.
        target: Entry point of a worker (see :data:`WorkerTarget`).
        sock: The bound, listening socket the workers share.
        stop_timeout: Seconds the workers get to drain and exit after SIGTERM before
            they are killed.
        metrics_path: prometheus-client multiprocess directory (dead workers' live
            gauges are removed from it).
    """

    def __init__(
        self,
        *,
        count: int,
        target: WorkerTarget,
        sock: socket.socket,
        stop_timeout: float,
        metrics_path: str | None = None,
    ) -> None:
        self.count = count
        self.target = target
        self.sock = sock
        self.stop_timeout = stop_timeout
        self.metrics_path = metrics_path
        self._ctx = multiprocessing.get_context("spawn")
        # Spawned workers are new interpreters: glibc reads this when each one starts.
        os.environ.setdefault("MALLOC_ARENA_MAX", str(WORKER_MALLOC_ARENAS))
        for name in _NATIVE_THREAD_VARIABLES:  # read when each one loads NumPy
            os.environ.setdefault(name, str(WORKER_NATIVE_THREADS))
        self._workers: dict[int, _Worker] = {}
        self._stopping: float | None = None  # monotonic time of the first stop signal
        self._interrupts = 0
        self._failed = False

    def _start(self, index: int) -> None:
        ready = self._ctx.Event()
        process = self._ctx.Process(
            target=self.target,
            args=(self.sock, ready, index),
            name=f"voice-agent-worker-{index}",
        )
        process.start()
        self._workers[index] = _Worker(index=index, process=process, ready=ready)
        logger.info(f"worker {index} started (pid {process.pid})")

    def _signal_all(self, sig: int) -> None:
        for worker in self._workers.values():
            if worker.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, sig)

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGINT:
            self._interrupts += 1
        if self._stopping is None:
            self._stopping = time.monotonic()
            name = signal.Signals(sig).name
            logger.info(f"{name}: draining {len(self._workers)} worker(s), then exiting")
            self._signal_all(signal.SIGTERM)
        elif sig == signal.SIGINT and self._interrupts >= 2:
            logger.warning("second interrupt: stopping the workers now")
            self._signal_all(signal.SIGINT)
        # A repeated SIGTERM (e.g. after a preStop hook that sent one) changes nothing.

    def _reap(self, worker: _Worker) -> None:
        worker.process.join(timeout=0)
        if self.metrics_path:
            with contextlib.suppress(Exception):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(worker.process.pid, self.metrics_path)

    async def run(self) -> int:
        """Start the workers and supervise them until they have all exited.

        Returns:
            0 after a requested stop; 1 when a worker failed to start.
        """
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            for index in range(self.count):
                self._start(index)
            await self._supervise()
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)
            for worker in self._workers.values():
                if worker.process.is_alive():
                    worker.process.kill()
                worker.process.join(timeout=5)
                self._reap(worker)
        return 1 if self._failed else 0

    async def _supervise(self) -> None:
        restart_at: dict[int, float] = {}
        while True:
            now = time.monotonic()
            for index, worker in list(self._workers.items()):
                if worker.process.is_alive() or index in restart_at:
                    continue
                self._reap(worker)
                code = worker.process.exitcode
                if self._stopping is not None:
                    continue
                if not worker.ready.is_set():
                    logger.error(
                        f"worker {index} exited with code {code} before it was ready; stopping"
                    )
                    self._failed = True
                    self._stopping = now
                    self._signal_all(signal.SIGINT)
                    continue
                logger.error(f"worker {index} died (exit code {code}); restarting it")
                restart_at[index] = now + RESTART_DELAY_SECS
            for index, when in list(restart_at.items()):
                if self._stopping is not None:
                    restart_at.pop(index)
                elif now >= when:
                    restart_at.pop(index)
                    self._start(index)
            alive = [w for w in self._workers.values() if w.process.is_alive()]
            if self._stopping is not None:
                if not alive:
                    logger.info("all workers exited")
                    return
                if now - self._stopping > self.stop_timeout:
                    logger.error(
                        f"{len(alive)} worker(s) still running {self.stop_timeout:.0f} s "
                        "after the stop signal; killing them"
                    )
                    for worker in alive:
                        worker.process.kill()
                    self._stopping = now - self.stop_timeout + 10  # then wait 10 s more
            await asyncio.sleep(0.1)

"""The parent of ``runner.py serve``: CPU count, metrics directory, multiprocess metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.supervisor import Supervisor, _cgroup_cpu_quota, available_cpus, metrics_dir

REPO = Path(__file__).resolve().parents[1]


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    assert _cgroup_cpu_quota(_cgroup(tmp_path, {"cpu.max": "150000 100000\n"})) == 1.5


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    assert _cgroup_cpu_quota(_cgroup(tmp_path, {"cpu.max": "max 100000\n"})) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path: Path) -> None:
    files = {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}
    assert _cgroup_cpu_quota(_cgroup(tmp_path / "a", files)) == 3.0
    files = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}
    assert _cgroup_cpu_quota(_cgroup(tmp_path / "b", files)) is None


@given(st.text(max_size=40))
def test_cgroup_garbage_is_no_limit(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = _cgroup(Path(tmp), {"cpu.max": text})
        quota = _cgroup_cpu_quota(root)  # never raises on whatever the file holds
        assert quota is None or quota > 0


def test_available_cpus_is_within_the_affinity() -> None:
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_given_metrics_dir_is_emptied_and_kept(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "counter_123.db").write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with metrics_dir() as path:
        assert path == str(tmp_path)
        assert not (tmp_path / "counter_123.db").exists()
    assert (tmp_path / "keep.txt").exists()


def test_temporary_metrics_dir_is_set_then_removed(monkeypatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with metrics_dir() as path:
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == path
        assert Path(path).is_dir()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert not Path(path).exists()


SCRIPT = """
import sys
from core import metrics
metrics.call_started()
metrics.call_finished("inbound", "booked")
metrics.call_started()  # still live when the process exits
metrics.READY_WORKERS.set(1)
print("ok")
"""


def test_a_given_metrics_dir_that_does_not_exist_yet_is_made(tmp_path: Path) -> None:
    """``PROMETHEUS_MULTIPROC_DIR`` on an empty volume (Kubernetes' emptyDir at /tmp): the
    metrics write their files as soon as ``core.metrics`` is imported, before ``serve``
    gets to make the directory."""
    missing = tmp_path / "metrics" / "here"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(missing), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "ok", proc.stderr
    assert list(missing.glob("gauge_livesum_*.db"))


@pytest.mark.parametrize("processes", [2])
def test_metrics_of_every_process_are_merged(tmp_path: Path, monkeypatch, processes: int) -> None:
    """Two processes write their samples; one render shows both, and a dead process's
    live gauges disappear once it is marked dead."""
    from prometheus_client import multiprocess

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    pids = []
    for _ in range(processes):
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.stdout.strip() == "ok", proc.stderr
        pids.extend(int(p.stem.rsplit("_", 1)[1]) for p in tmp_path.glob("gauge_livesum_*.db"))
    render = """
from core.metrics import render_metrics
print(render_metrics()[0].decode())
"""
    text = subprocess.run(
        [sys.executable, "-c", render], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert 'voice_agent_calls_total{direction="inbound",outcome="booked"} 2.0' in text
    # livesum counts only live processes: both writers have exited but are not yet
    # marked dead, so their gauges still count; marking them dead removes them.
    assert "voice_agent_active_calls 2.0" in text
    for pid in set(pids):
        multiprocess.mark_process_dead(pid, str(tmp_path))
    text = subprocess.run(
        [sys.executable, "-c", render], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert "voice_agent_active_calls 0.0" in text
    assert 'voice_agent_calls_total{direction="inbound",outcome="booked"} 2.0' in text


def test_freezing_the_start_up_heap_leaves_later_garbage_collectable() -> None:
    import gc
    import weakref

    from core.supervisor import freeze_startup_heap

    class Node:
        pass

    try:
        assert freeze_startup_heap() > 1000  # pytest, this module, the app's imports
        assert gc.get_freeze_count() > 1000
        # A cycle a call makes after start-up is still found and freed by the collector.
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()


def test_workers_get_one_math_library_thread_unless_told(monkeypatch) -> None:
    """Spawned workers inherit ``OPENBLAS_NUM_THREADS=1`` (and OpenMP's, MKL's); a value
    the operator gave is kept."""
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(name, raising=False)  # and put back as they were afterwards
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with socket.socket() as sock:
        Supervisor(count=1, target=print, sock=sock, stop_timeout=1)
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["MKL_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "3"

"""The server process: embedded Postgres/Redis lifecycle, /health, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi import FastAPI

from core.embedded import EmbeddedPostgres, EmbeddedRedis
from core.settings import Settings
from runner import create_app

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_processes(data_dir: Path) -> list[psutil.Process]:
    """postgres / redis-server processes whose command line or cwd points into data_dir
    (Redis rewrites its command line; its cwd is its ``--dir``)."""
    found = []
    marker = str(data_dir.resolve())
    for proc in psutil.process_iter(["name", "cmdline", "cwd"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            name = proc.info["name"] or ""
            where = f"{cmd} {proc.info['cwd'] or ''}"
            if ("postgres" in name or "redis" in name or "postgres" in cmd) and marker in where:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_embedded_servers_start_and_stop_without_leftovers(server_tmp: Path) -> None:
    pg = EmbeddedPostgres().start(server_tmp / "pg")
    rd = EmbeddedRedis().start(server_tmp / "redis")
    try:
        import psycopg
        import redis

        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert redis.Redis.from_url(rd.url).ping()
        assert server_processes(server_tmp), "the servers should be visible while running"
    finally:
        pg.stop()
        rd.stop()
    deadline = time.monotonic() + 10
    while server_processes(server_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server_processes(server_tmp) == []
    pg.stop()  # idempotent
    rd.stop()


def wait_for_health(base: str, proc: subprocess.Popen, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"server exited with {proc.returncode}:\n{out[-3000:]}")
        try:
            return httpx.get(f"{base}/health", timeout=2)
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.25)
    raise AssertionError(f"no /health answer in {timeout} s: {last}")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_runner_starts_on_embedded_servers_and_stops_cleanly(
    server_tmp: Path, stop_signal: signal.Signals
) -> None:
    """`python runner.py` with no DATABASE_URL/REDIS_URL: seeded CRM, /health 200, no orphans."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(server_tmp),
        "DATA_DIR": str(server_tmp / "data"),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "INFO",
    }
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "runner.py")],
        cwd=server_tmp,  # not the repo: .env there must not leak in; runner finds its files
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        response = wait_for_health(f"http://127.0.0.1:{port}", proc, timeout=90)
        assert response.status_code == 200, response.text
        assert response.json()["components"] == {"db": "ok", "redis": "ok"}
        assert server_processes(server_tmp / "data")
    finally:
        proc.send_signal(stop_signal)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise
    assert proc.returncode in (0, -stop_signal), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # The demo CRM was seeded, and the log names the missing API keys without PII.
    assert "Seeded the embedded CRM" in out
    assert f"embedded Postgres ready at {(server_tmp / 'data' / 'postgres').resolve()}" in out
    assert "OPENAI_API_KEY" in out
    assert "+1555555" not in out
    deadline = time.monotonic() + 10
    while server_processes(server_tmp / "data") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server_processes(server_tmp / "data") == []


async def test_health_is_503_when_redis_goes_down(migrated_db: str, tmp_path: Path) -> None:
    redis_server = EmbeddedRedis().start(tmp_path / "redis")
    settings = Settings(
        _env_file=None, DATABASE_URL=migrated_db, REDIS_URL=redis_server.url, ADMIN_TOKEN="ops"
    )
    admin = {"Authorization": "Bearer ops"}
    app: FastAPI = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                ok = await client.get("/health")
                assert ok.status_code == 200
                assert ok.json() == {"status": "ok", "components": {"db": "ok", "redis": "ok"}}

                redis_server.stop()
                down = await client.get("/health")
                assert down.status_code == 503
                body = down.json()
                assert body["status"] == "degraded"
                assert body["components"]["db"] == "ok"
                assert body["components"]["redis"].startswith("down")
                # The ops views say Redis is down too, without a 500.
                for path in ("/calls/active", "/calls/CA123"):
                    refused = await client.get(path, headers=admin)
                    assert refused.status_code == 503, refused.text
                    assert "Redis" in refused.json()["error"]

                redis_server.start(tmp_path / "redis")
                deadline = time.monotonic() + 10
                back = await client.get("/health")
                while back.status_code != 200 and time.monotonic() < deadline:
                    back = await client.get("/health")
                assert back.status_code == 200
                assert (await client.get("/calls/active", headers=admin)).json() == {"calls": []}
    finally:
        redis_server.stop()


def test_startup_names_an_unreachable_database(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nope?connect_timeout=1",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "DATA_DIR": str(tmp_path / "data"),
        "PORT": str(port),
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "runner.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Postgres is unreachable" in output and "DATABASE_URL" in output
    assert "Traceback" not in output


async def test_calls_are_refused_with_the_missing_keys_named(
    migrated_db: str, redis_server_url: str
) -> None:
    settings = Settings(_env_file=None, DATABASE_URL=migrated_db, REDIS_URL=redis_server_url)
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/twilio/voice", data={"CallSid": "CA1"})
            assert response.status_code == 503
            for name in ("OPENAI_API_KEY", "DEEPGRAM_API_KEY", "TWILIO_AUTH_TOKEN"):
                assert name in response.text
            assert (await client.get("/health")).status_code == 200


async def test_admin_routes_refuse_a_non_ascii_token_with_401(
    migrated_db: str, redis_server_url: str
) -> None:
    settings = Settings(
        _env_file=None, DATABASE_URL=migrated_db, REDIS_URL=redis_server_url, ADMIN_TOKEN="s3cret"
    )
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for value in ("Bearer s3crét".encode(), b"Bearer \xff\xfe", "Bearer ☎".encode()):
                for path in ("/calls/active", "/calls/CA123"):
                    response = await client.get(path, headers={"Authorization": value})
                    assert response.status_code == 401, (value, path, response.text)
                    assert response.json() == {"detail": "admin token required"}
            ok = await client.get("/calls/active", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json() == {"calls": []}


async def test_admin_routes_say_they_are_disabled_without_admin_token(
    migrated_db: str, redis_server_url: str
) -> None:
    settings = Settings(_env_file=None, DATABASE_URL=migrated_db, REDIS_URL=redis_server_url)
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for headers in ({}, {"Authorization": "Bearer anything"}):
                for path in ("/calls/active", "/calls/CA123"):
                    response = await client.get(path, headers=headers)
                    assert response.status_code == 503, (path, response.text)
                    detail = response.json()["detail"]
                    assert "admin routes are disabled" in detail and "ADMIN_TOKEN" in detail


async def test_sms_webhooks_share_the_signed_form_check(
    migrated_db: str, redis_server_url: str
) -> None:
    # One check for every Twilio webhook (api.deps.TwilioFormDep): the texts' routes answer
    # as the calls' do, 503 naming what is missing, 415 / 413 for a body of the wrong type
    # or size, 403 without a valid signature.
    base = {"_env_file": None, "DATABASE_URL": migrated_db, "REDIS_URL": redis_server_url}
    unsigned = Settings(**base)  # type: ignore[arg-type]
    app: FastAPI = create_app(unsigned)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for path in ("/twilio/sms", "/twilio/sms/status"):
                response = await client.post(path, data={"Body": "C"})
                assert response.status_code == 503, (path, response.text)
                assert "TWILIO_AUTH_TOKEN" in response.text and "PUBLIC_BASE_URL" in response.text
    signed = Settings(
        **base,  # type: ignore[arg-type]
        TWILIO_AUTH_TOKEN="tok",
        PUBLIC_BASE_URL="https://agent.example.com",
    )
    app = create_app(signed)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for path in ("/twilio/sms", "/twilio/sms/status"):
                multipart = await client.post(path, files={"Body": ("b.txt", b"C")})
                assert multipart.status_code == 415, (path, multipart.text)
                huge = await client.post(path, data={"Body": "x" * 1_100_000})
                assert huge.status_code == 413, (path, huge.text)
                forged = await client.post(
                    path, data={"Body": "C"}, headers={"X-Twilio-Signature": "forged"}
                )
                assert forged.status_code == 403 and forged.text == "invalid signature"

"""A TCP proxy on 127.0.0.1 that a test can cut and restore: Postgres or Redis "going down".

The app connects to the proxy (``postgresql://postgres@127.0.0.1:PORT/db``,
``redis://127.0.0.1:PORT/0``); the proxy forwards bytes unchanged to the real server on a
TCP address or a unix socket (the embedded servers listen on unix sockets only). Nothing is
parsed: both sides speak their own wire protocol through it.

:meth:`TcpProxy.cut` kills every open connection (like a crashed or restarted server) and
then, until :meth:`TcpProxy.restore`, either refuses new connections (``"refuse"``: the
port is closed, ``ECONNREFUSED``) or accepts them and never answers (``"blackhole"``: a
network partition; clients wait for their own timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Literal

CutMode = Literal["refuse", "blackhole"]


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the client's writer and the upstream writer."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    """A cuttable TCP proxy.

    Attributes:
        host: Listen host (127.0.0.1).
        port: Listen port (fixed for the proxy's lifetime, also across cut/restore).
        upstream_host: Upstream TCP host, or None with ``upstream_unix``.
        upstream_port: Upstream TCP port.
        upstream_unix: Upstream unix socket path.
        mode: ``"up"`` while forwarding, else the cut mode.
        connections: Client connections accepted so far (all modes).
        forwarded: Client connections that reached the upstream.
        refused_while_cut: Connections held (blackhole) while cut.
        cut_at: Monotonic time of the latest cut.
        restored_at: Monotonic time of the latest restore.
    """

    def __init__(
        self,
        *,
        upstream_host: str | None = None,
        upstream_port: int | None = None,
        upstream_unix: str | None = None,
    ) -> None:
        """Initialises the proxy (not started).

        Args:
            upstream_host: Upstream TCP host.
            upstream_port: Upstream TCP port.
            upstream_unix: Upstream unix socket path (instead of host and port).
        """
        if upstream_unix is None and (upstream_host is None or upstream_port is None):
            raise ValueError("give upstream_unix, or upstream_host and upstream_port")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.upstream_unix = upstream_unix
        self.host = "127.0.0.1"
        self.port = 0
        self.mode: Literal["up", "refuse", "blackhole"] = "up"
        self.connections = 0
        self.forwarded = 0
        self.refused_while_cut = 0
        self.cut_at: float | None = None
        self.restored_at: float | None = None
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._held: set[asyncio.StreamWriter] = set()

    @classmethod
    def for_postgres_url(cls, url: str) -> TcpProxy:
        """A proxy in front of the Postgres server of ``url`` (TCP or unix socket).

        Args:
            url: libpq connection string or URL.

        Returns:
            The proxy (not started).
        """
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(url)
        host = str(params.get("host") or "127.0.0.1")
        port = int(params.get("port") or 5432)
        if host.startswith("/"):
            return cls(upstream_unix=f"{host}/.s.PGSQL.{port}")
        return cls(upstream_host=host, upstream_port=port)

    @classmethod
    def for_redis_url(cls, url: str) -> TcpProxy:
        """A proxy in front of the Redis server of ``url`` (``redis://`` or ``unix://``).

        Args:
            url: Redis URL.

        Returns:
            The proxy (not started).
        """
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme == "unix":
            return cls(upstream_unix=parts.path)
        return cls(upstream_host=parts.hostname or "127.0.0.1", upstream_port=parts.port or 6379)

    def postgres_url(self, url: str) -> str:
        """``url`` (same user and database) pointed at the proxy.

        Args:
            url: The direct connection string.

        Returns:
            A connection string through the proxy.
        """
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(url)
        params["host"] = self.host
        params["port"] = str(self.port)
        return make_conninfo(**params)

    def redis_url(self, db: int = 0) -> str:
        """A ``redis://`` URL through the proxy.

        Args:
            db: Logical database.

        Returns:
            The URL.
        """
        return f"redis://{self.host}:{self.port}/{db}"

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Listens on a free port (kept across cut and restore)."""
        await self._listen()

    async def stop(self) -> None:
        """Closes the listener and every connection."""
        await self._close_listener()
        self._kill_all()

    async def __aenter__(self) -> TcpProxy:
        """Starts the proxy."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stops the proxy."""
        await self.stop()

    async def cut(self, mode: CutMode = "refuse") -> None:
        """Kills every open connection, then refuses or black-holes new ones.

        Args:
            mode: ``"refuse"`` closes the port; ``"blackhole"`` accepts and never answers.
        """
        self.mode = mode
        self.cut_at = time.monotonic()
        if mode == "refuse":
            await self._close_listener()
        elif self._server is None:
            await self._listen()
        self._kill_all()

    async def restore(self) -> None:
        """Forwards again (the same port); black-holed connections are dropped."""
        self.mode = "up"
        self.restored_at = time.monotonic()
        for writer in list(self._held):
            _abort(writer)
        self._held.clear()
        if self._server is None:
            await self._listen()

    # --- internals -------------------------------------------------------------------

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._on_client, sock=sock)
        self.port = sock.getsockname()[1]

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
            self._server = None

    def _kill_all(self) -> None:
        for pair in list(self._pairs):
            _abort(pair.client)
            if pair.upstream is not None:
                _abort(pair.upstream)
            for task in pair.tasks:
                task.cancel()
        self._pairs.clear()
        for writer in list(self._held):
            _abort(writer)
        self._held.clear()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "blackhole":
            self.refused_while_cut += 1
            self._held.add(writer)
            return
        if self.mode == "refuse":  # raced with a cut
            _abort(writer)
            return
        pair = _Pair(client=writer)
        self._pairs.add(pair)
        try:
            if self.upstream_unix is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self.upstream_unix)
            else:
                assert self.upstream_host is not None and self.upstream_port is not None
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
        except OSError:
            self._pairs.discard(pair)
            _abort(writer)
            return
        if pair not in self._pairs:  # cut while connecting
            _abort(up_writer)
            return
        self.forwarded += 1
        pair.upstream = up_writer
        pair.tasks = [
            asyncio.create_task(self._pipe(reader, up_writer, pair)),
            asyncio.create_task(self._pipe(up_reader, writer, pair)),
        ]

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            # One side closed: close both, as a real TCP connection through a NAT would.
            if pair in self._pairs:
                self._pairs.discard(pair)
                with contextlib.suppress(Exception):
                    pair.client.close()
                if pair.upstream is not None:
                    with contextlib.suppress(Exception):
                        pair.upstream.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Drops a connection at once (RST), like a dead peer."""
    with contextlib.suppress(Exception):
        transport = writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: close sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

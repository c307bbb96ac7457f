"""Who may use the console: passwords, server-side sessions, CSRF tokens, login rate limit.

* Users: ``admin`` with ``ADMIN_TOKEN`` as password (when it is set), and the users of the
  ``ops_users`` table (scrypt hashes; ``python -m ops.users add NAME``).
* Sessions live in Redis (``<REDIS_KEY_PREFIX>:ops:session:<sha256 of the cookie value>``) and
  expire after ``OPS_SESSION_TTL_SECS`` without use, and at the latest twice that after the
  login. The cookie holds 256 random bits only (HttpOnly, SameSite=Strict, path ``/ops``,
  Secure on https); logging out deletes the Redis key.
* Each session has its own CSRF token; every POST form carries it and is refused (403)
  without it. The login form itself uses a double-submit cookie.
* Failed logins are counted per client IP address in Redis; past
  ``OPS_LOGIN_MAX_FAILURES`` the address is refused for ``OPS_LOGIN_LOCKOUT_SECS``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from core.settings import DEFAULT_REDIS_KEY_PREFIX

SESSION_COOKIE = "ops_session"
LOGIN_CSRF_COOKIE = "ops_login_csrf"
ADMIN_USER = "admin"
#: scrypt cost: 16 MiB of memory and some tens of milliseconds per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_DUMMY_HASH: str | None = None


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """An scrypt hash of ``password`` as ``scrypt$n$r$p$salt$hash`` (base64 parts)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Whether ``password`` matches ``stored`` (constant time; a missing user costs the same).

    Args:
        password: What was typed.
        stored: The stored hash, or ``None`` for an unknown user (a dummy hash is checked
            so the answer takes as long).

    Returns:
        True on a match.
    """
    global _DUMMY_HASH
    if stored is None:
        _DUMMY_HASH = _DUMMY_HASH or hash_password(secrets.token_hex(8))
        stored, known = _DUMMY_HASH, False
    else:
        known = True
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected) and known


def tokens_match(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison of two tokens; False when either is missing."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class OpsSession:
    """A logged-in console user.

    Attributes:
        user: User name (``admin`` or an ``ops_users`` row).
        csrf: The session's CSRF token.
        created_at: Unix time of the login.
    """

    user: str
    csrf: str
    created_at: float


class SessionStore:
    """Console sessions in Redis.

    Args:
        redis: The process's Redis client.
        ttl_secs: Idle lifetime; a session never outlives twice this after its login.
    """

    def __init__(
        self, redis: aioredis.Redis, *, ttl_secs: int, prefix: str = DEFAULT_REDIS_KEY_PREFIX
    ) -> None:
        """Initialize the store."""
        self._redis = redis
        self._ttl = int(ttl_secs)
        self._prefix = f"{prefix}:ops"

    def _key(self, token: str) -> str:
        return f"{self._prefix}:session:{hashlib.sha256(token.encode()).hexdigest()}"

    async def create(self, user: str) -> tuple[str, OpsSession]:
        """Start a session for ``user``; returns the cookie value and the session."""
        token = secrets.token_urlsafe(32)
        session = OpsSession(user=user, csrf=secrets.token_urlsafe(32), created_at=time.time())
        payload = json.dumps({"user": user, "csrf": session.csrf, "created_at": session.created_at})
        await self._redis.set(self._key(token), payload, ex=self._ttl)
        return token, session

    async def get(self, token: str | None) -> OpsSession | None:
        """The session of a cookie value (its idle timer restarted), or None."""
        if not token or len(token) > 100:
            return None
        key = self._key(token)
        raw = await self._redis.get(key)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            session = OpsSession(
                user=str(data["user"]), csrf=str(data["csrf"]), created_at=float(data["created_at"])
            )
        except (ValueError, KeyError, TypeError):
            await self._redis.delete(key)
            return None
        if time.time() - session.created_at > 2 * self._ttl:
            await self._redis.delete(key)
            return None
        await self._redis.expire(key, self._ttl)
        return session

    async def delete(self, token: str | None) -> None:
        """End the session of a cookie value (nothing when there is none)."""
        if token and len(token) <= 100:
            await self._redis.delete(self._key(token))


class LoginLimiter:
    """Failed logins per client address, in Redis.

    Args:
        redis: The process's Redis client.
        max_failures: Failures allowed within the window.
        window_secs: How long failures are remembered (from the first one).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        max_failures: int,
        window_secs: int,
        prefix: str = DEFAULT_REDIS_KEY_PREFIX,
    ) -> None:
        """Initialize the limiter."""
        self._redis = redis
        self._max = int(max_failures)
        self._window = int(window_secs)
        self._prefix = f"{prefix}:ops"

    def _key(self, client_ip: str) -> str:
        return f"{self._prefix}:login_failures:{client_ip[:64]}"

    async def locked_for(self, client_ip: str) -> int:
        """Seconds this address must still wait; 0 when it may try."""
        key = self._key(client_ip)
        failures = await self._redis.get(key)
        if failures is None or int(failures) < self._max:
            return 0
        ttl = await self._redis.ttl(key)
        return max(int(ttl), 1)

    async def failed(self, client_ip: str) -> None:
        """Count a failed login of this address."""
        key = self._key(client_ip)
        count = await self._redis.incr(key)
        if int(count) == 1:
            await self._redis.expire(key, self._window)

    async def succeeded(self, client_ip: str) -> None:
        """Forget the failures of this address."""
        await self._redis.delete(self._key(client_ip))


async def check_credentials(
    *, username: str, password: str, admin_token: str | None, stored_hash: str | None
) -> bool:
    """Whether ``username``/``password`` are valid (scrypt runs in a thread).

    Args:
        username: Normalised user name.
        password: What was typed.
        admin_token: ``ADMIN_TOKEN`` (the password of ``admin``), if set.
        stored_hash: The ``ops_users`` hash of ``username``, if any.
    """
    if username == ADMIN_USER:
        return bool(admin_token) and tokens_match(password, admin_token)
    return await asyncio.to_thread(verify_password, password, stored_hash)

"""Shared-secret checks for the operator endpoints (``ADMIN_TOKEN``).

Header values reach the app decoded as latin-1, so they may hold any character;
:func:`hmac.compare_digest` refuses non-ASCII ``str``. Both sides are compared as UTF-8
bytes instead, which is constant-time and never raises.
"""

from __future__ import annotations

import hashlib
import hmac


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the configured one.

    Args:
        given: What the client sent (any text, or None).
        expected: The configured secret.

    Returns:
        Whether they are equal; False for a missing or empty ``given``.
    """
    if not given or not expected:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an ``Authorization`` header.

    ``Bearer <token>`` (scheme case-insensitive); a bare token is accepted as well.

    Args:
        authorization: The header value, or None.

    Returns:
        The token, or None when the header is missing or blank.
    """
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    token = rest.strip() if scheme.lower() == "bearer" else authorization.strip()
    return token or None


def derived_token(secret: str, purpose: str) -> str:
    """A value derived from ``secret`` for one purpose (e.g. a cookie), not the secret.

    Args:
        secret: The configured secret.
        purpose: A fixed label naming where the value is used.

    Returns:
        Hex HMAC-SHA256 of ``purpose`` keyed by ``secret``.
    """
    return hmac.new(secret.encode("utf-8"), purpose.encode("utf-8"), hashlib.sha256).hexdigest()

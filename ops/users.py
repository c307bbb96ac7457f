"""Console users: ``python -m ops.users add NAME`` (asks for the password) or ``disable NAME``.

Besides these users, ``admin`` logs in with ``ADMIN_TOKEN`` (the name is reserved). User
names are 1-40 characters of lower-case letters, digits, ``.``, ``_`` and ``-``; passwords
need at least 12 characters and are stored as scrypt hashes in ``ops_users``. Uses the
same database as the server (``DATABASE_URL``, or the embedded one under ``DATA_DIR``).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import sys

from core.profile import ProfileError
from core.resources import StartupError, open_resources
from core.settings import get_settings
from crm import ops as crm_ops
from crm.migrate import apply_migrations
from ops.auth import ADMIN_USER, hash_password

USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")
MIN_PASSWORD = 12


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


async def _run(command: str, username: str, password: str | None) -> int:
    settings = get_settings()
    async with open_resources(settings, migrate=apply_migrations, seed_demo=None) as resources:
        async with resources.db.connection() as conn:
            if command == "add":
                assert password is not None
                digest = await asyncio.to_thread(hash_password, password)
                await crm_ops.set_user(conn, username=username, password_hash=digest)
                print(f"user {username} can log in at /ops/login")
                return 0
            if await crm_ops.disable_user(conn, username=username):
                print(f"user {username} disabled")
                return 0
            print(f"no user {username}", file=sys.stderr)
            return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ops.users``."""
    parser = argparse.ArgumentParser(prog="python -m ops.users", description=__doc__)
    parser.add_argument("command", choices=("add", "disable"))
    parser.add_argument("username")
    args = parser.parse_args(argv)
    username = args.username.strip().lower()
    if not USERNAME.fullmatch(username) or username == ADMIN_USER:
        print(
            "user names are 1-40 of a-z 0-9 . _ - (and 'admin' is reserved for ADMIN_TOKEN)",
            file=sys.stderr,
        )
        return 2
    password = None
    if args.command == "add":
        try:
            password = _read_password()
        except (ValueError, EOFError) as exc:
            print(str(exc) or "no password given", file=sys.stderr)
            return 2
        if len(password) < MIN_PASSWORD:
            print(f"the password needs at least {MIN_PASSWORD} characters", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_run(args.command, username, password))
    except (StartupError, ProfileError) as exc:
        print(str(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Google Calendar backend: appointments mirrored as events, shop busy time from free/busy.

:class:`GoogleCalendar` implements :class:`scheduling.calendar.Calendar` on top of the
``gcsa`` client:

* every appointment is mirrored as one event on ``GOOGLE_CALENDAR_ID``. The event carries
  private extended properties with the appointment id and confirmation code, so a retried
  create finds the event it already made instead of adding a duplicate. A rescheduled
  appointment takes over (moves) the event of the appointment it replaces; a cancelled
  one deletes its event.
* mirrored events are created *transparent* ("show me as available"), so Google's
  free/busy reports only what staff put on the calendar (closures, meetings, training):
  exactly the shop-wide busy time that :meth:`GoogleCalendar.busy` must return. The
  appointments themselves already block their bay through the appointments table.
* Google is never allowed to break or block a booking. Every gcsa call is blocking and
  runs in a worker thread under a timeout; a failed sync leaves the appointment with
  ``calendar_sync_state = 'failed'`` (and a short error) for :func:`sync_pending` to
  retry, and a failed free/busy lookup returns no extra busy time, counted in
  :data:`CALENDAR_ERRORS_TOTAL` and on the instance.

Credentials come from a stored OAuth refresh token (``GOOGLE_REFRESH_TOKEN`` with the
client id and secret); there is never a browser flow. The API description is the one
bundled with ``google-api-python-client`` (static discovery), so nothing is downloaded
before the first real request.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import weakref
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import google_auth_httplib2
import httplib2
from gcsa.event import Event, Transparency
from gcsa.google_calendar import GoogleCalendar as GcsaCalendar
from google.auth.credentials import Credentials as AuthCredentials
from google.oauth2.credentials import Credentials
from googleapiclient import discovery
from googleapiclient.errors import HttpError
from loguru import logger
from prometheus_client import Counter
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from core.metrics import REGISTRY
from crm.appointments import (
    AppointmentRow,
    calendar_mirror,
    pending_calendar_syncs,
    set_calendar_sync,
)

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from core.profile import DealershipProfile
    from core.settings import Settings

T = TypeVar("T")

#: Seconds one Google request may take (socket timeout and asyncio timeout).
DEFAULT_TIMEOUT_S = 10.0
#: Seconds a free/busy lookup may take: it runs while a caller waits for times.
DEFAULT_BUSY_TIMEOUT_S = 3.0
#: OAuth scope the refresh token must have been granted.
CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar"
#: Google's OAuth 2.0 token endpoint (refresh-token grant).
TOKEN_URI = "https://oauth2.googleapis.com/token"
#: Private extended property holding the appointment id.
APPOINTMENT_PROPERTY = "dealershipAppointmentId"
#: Private extended property holding the confirmation code (tells environments apart).
CODE_PROPERTY = "dealershipConfirmationCode"
#: Statuses whose appointment no longer occupies the calendar.
INACTIVE_STATUSES = frozenset({"cancelled", "no_show"})
#: How far around the appointment an existing event is searched for.
SEARCH_WINDOW = timedelta(days=400)
#: HTTP statuses meaning "that event is gone".
_GONE = frozenset({404, 410})

CALENDAR_ERRORS_TOTAL = Counter(
    "voice_agent_calendar_errors_total",
    "Google Calendar operations that failed (busy: free/busy lookup, sync: event mirror).",
    ["operation"],
    registry=REGISTRY,
)


def refresh_token_credentials(
    *, client_id: str, client_secret: str, refresh_token: str
) -> Credentials:
    """OAuth user credentials from a stored refresh token (no browser flow).

    The access token is fetched on the first request and refreshed when it expires.

    Args:
        client_id: OAuth client id.
        client_secret: OAuth client secret.
        refresh_token: Refresh token granted for :data:`CALENDAR_SCOPE`.

    Returns:
        Credentials without an access token yet.
    """
    return Credentials(
        token=None,
        refresh_token=refresh_token,
        client_id=client_id,
        client_secret=client_secret,
        token_uri=TOKEN_URI,
        scopes=[CALENDAR_SCOPE],
    )


def build_client(
    *,
    calendar_id: str,
    credentials: AuthCredentials,
    api_endpoint: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> GcsaCalendar:
    """A gcsa client whose HTTP requests time out and may go to another endpoint.

    gcsa builds its API service with default HTTP settings and Google's endpoint; the
    service is rebuilt here (from the bundled discovery document) with a socket timeout
    and, when given, ``api_endpoint`` (tests point it at a local fake of the API).

    Args:
        calendar_id: Calendar the client works on by default.
        credentials: Google credentials (user credentials, or anonymous in tests).
        api_endpoint: Base URL of the Calendar API including the service path, e.g.
            ``http://127.0.0.1:8080/calendar/v3/``; Google's when omitted.
        timeout: Socket timeout in seconds of each request.

    Returns:
        The client; not thread-safe (one per thread, see :class:`ClientPool`).
    """
    # gcsa's GoogleCalendar annotates ``credentials`` as google.oauth2 user Credentials but
    # hands them to its AuthenticatedService, typed (and working) with any google.auth ones.
    client = GcsaCalendar(
        calendar_id,
        credentials=credentials,  # pyright: ignore[reportArgumentType]
    )
    http = google_auth_httplib2.AuthorizedHttp(credentials, http=httplib2.Http(timeout=timeout))
    client.service = discovery.build(
        "calendar",
        "v3",
        http=http,
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": api_endpoint} if api_endpoint else None,
    )
    return client


class ClientPool:
    """One gcsa client per worker thread: httplib2 connections are not thread-safe."""

    def __init__(self, factory: Callable[[], GcsaCalendar]) -> None:
        """Create an empty pool.

        Args:
            factory: Builds a client; called once per worker thread that needs one.
        """
        self._factory = factory
        self._local = threading.local()

    def get(self) -> GcsaCalendar:
        """The calling thread's client, built on first use."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._factory()
        return client


_POOLS: dict[tuple[str, str, str], ClientPool] = {}
_POOLS_LOCK = threading.Lock()
_APPOINTMENT_LOCKS: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()


def _pool_for_settings(settings: Settings) -> ClientPool:
    """The process-wide client pool for the configured calendar and token."""
    assert settings.google_client_id and settings.google_calendar_id
    assert settings.google_client_secret and settings.google_refresh_token
    client_id = settings.google_client_id
    calendar_id = settings.google_calendar_id
    secret = settings.google_client_secret.get_secret_value()
    token = settings.google_refresh_token.get_secret_value()
    key = (client_id, calendar_id, hashlib.sha256(f"{secret}|{token}".encode()).hexdigest())
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            credentials = refresh_token_credentials(
                client_id=client_id, client_secret=secret, refresh_token=token
            )
            pool = _POOLS[key] = ClientPool(
                lambda: build_client(calendar_id=calendar_id, credentials=credentials)
            )
        return pool


def _short_error(exc: BaseException) -> str:
    """A short, PII-free description of a failure (no response bodies)."""
    if isinstance(exc, HttpError):
        return f"HTTP {exc.resp.status}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


#: Attempts of one Google call when it fails transiently, and the first backoff.
RETRY_ATTEMPTS = 3
RETRY_FIRST_DELAY_S = 0.2
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, HttpError):
        return exc.resp.status in _TRANSIENT_STATUSES
    return isinstance(exc, ConnectionError)


def _is_gone(exc: BaseException) -> bool:
    return isinstance(exc, HttpError) and exc.resp.status in _GONE


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class GoogleCalendar:
    """Calendar backend that mirrors appointments to Google Calendar.

    Attributes:
        initial_sync_state: New appointments start ``pending`` until mirrored.
        busy_failures: Free/busy lookups that failed on this instance.
        sync_failures: Appointment syncs that failed on this instance.
        last_error: Short description of the latest failure, or ``None``.
    """

    initial_sync_state = "pending"

    def __init__(
        self,
        *,
        clients: ClientPool | Callable[[], GcsaCalendar],
        profile: DealershipProfile,
        db: AsyncConnectionPool,
        timeout: float = DEFAULT_TIMEOUT_S,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        """Create the backend.

        Args:
            clients: Pool of gcsa clients, or a factory building one (one per thread).
            profile: Dealership profile (time zone, service names).
            db: Pool where sync states are recorded.
            timeout: Seconds one Google request may take.
            busy_timeout: Seconds a free/busy lookup may take (the caller is waiting).
        """
        self._clients = clients if isinstance(clients, ClientPool) else ClientPool(clients)
        self._profile = profile
        self._db = db
        self._timeout = timeout
        self._busy_timeout = min(busy_timeout, timeout)
        self.busy_failures = 0
        self.sync_failures = 0
        self.last_error: str | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, profile: DealershipProfile, db: AsyncConnectionPool
    ) -> GoogleCalendar:
        """The backend for the ``GOOGLE_*`` settings.

        Cheap: clients are shared by the whole process and built lazily, in a worker
        thread, on the first request.

        Args:
            settings: Settings with all four Google Calendar values.
            profile: Dealership profile.
            db: Connection pool.

        Returns:
            The backend.

        Raises:
            ValueError: A Google Calendar setting is missing.
        """
        if not settings.google_calendar_enabled:
            raise ValueError("Google Calendar settings are incomplete")
        return cls(clients=_pool_for_settings(settings), profile=profile, db=db)

    @property
    def _tz_name(self) -> str:
        return self._profile.time_zone.key

    async def _call(
        self,
        fn: Callable[[GcsaCalendar], T],
        *,
        limit_s: float | None = None,
        attempts: int = RETRY_ATTEMPTS,
    ) -> T:
        """Run a blocking gcsa call in a worker thread with this thread's client.

        Transient failures (HTTP 429/5xx, connection errors) are retried with exponential
        backoff (0.2 s, then 0.6 s); a timeout is not, since the request may still complete
        at Google. The last failure is raised as it is.
        """

        async def once() -> T:
            return await asyncio.wait_for(
                asyncio.to_thread(lambda: fn(self._clients.get())), limit_s or self._timeout
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=RETRY_FIRST_DELAY_S, exp_base=3),
            retry=retry_if_exception(_is_transient),
            reraise=True,
        )
        return await retrying(once)

    def _failed(self, operation: str, exc: BaseException) -> str:
        error = _short_error(exc)
        self.last_error = f"{operation}: {error}"
        CALENDAR_ERRORS_TOTAL.labels(operation=operation).inc()
        return error

    # -- free/busy ---------------------------------------------------------------------

    async def busy(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """Busy intervals of the Google calendar in ``[start, end)``.

        Mirrored appointments are transparent and so not included.

        Args:
            start: Range start (aware).
            end: Range end (aware).

        Returns:
            Busy intervals as aware datetimes in the dealership's time zone, sorted; empty
            when Google cannot be reached (counted in :attr:`busy_failures`).
        """
        try:
            free_busy = await self._call(
                lambda c: c.get_free_busy(time_min=start, time_max=end, timezone=self._tz_name),
                limit_s=self._busy_timeout,
                attempts=1,  # a caller is waiting: no retries on the voice path
            )
            ranges = list(free_busy)
        except Exception as exc:
            self.busy_failures += 1
            error = self._failed("busy", exc)
            logger.warning(f"Google free/busy lookup failed ({error}); no extra busy time used")
            return []
        tz = self._profile.time_zone
        return sorted((_aware(s).astimezone(tz), _aware(e).astimezone(tz)) for s, e in ranges)

    # -- appointment mirror ------------------------------------------------------------

    async def appointment_changed(
        self, appointment: AppointmentRow, *, first_name: str, vehicle: str
    ) -> None:
        """Mirror a booked, moved or cancelled appointment; never raises.

        Args:
            appointment: The appointment as it is now.
            first_name: Customer's first name, for the event title.
            vehicle: Vehicle description, e.g. ``2021 Toyota Camry``.
        """
        await self.sync_appointment(appointment, first_name=first_name, vehicle=vehicle)

    async def sync_appointment(
        self, appointment: AppointmentRow, *, first_name: str, vehicle: str
    ) -> bool:
        """Mirror one appointment and record the outcome on its row; never raises.

        Active appointments get their event created or updated (a rescheduled one takes
        over the event of the appointment it replaces); cancelled and no-show ones get
        their event deleted. The row ends ``synced`` with its event id, or ``failed``
        with a short error.

        Args:
            appointment: The appointment as it is now.
            first_name: Customer's first name, for the event title.
            vehicle: Vehicle description.

        Returns:
            Whether the calendar now matches the appointment.
        """
        lock = _APPOINTMENT_LOCKS.get(appointment.id)
        if lock is None:
            lock = _APPOINTMENT_LOCKS[appointment.id] = asyncio.Lock()
        async with lock:
            try:
                if appointment.status in INACTIVE_STATUSES:
                    event_id = await self._remove_event(appointment)
                else:
                    event_id = await self._upsert_event(appointment, first_name, vehicle)
            except Exception as exc:
                self.sync_failures += 1
                error = self._failed("sync", exc)
                logger.warning(f"calendar sync of appointment {appointment.id} failed: {error}")
                await self._record(appointment.id, "failed", error=error)
                return False
            return await self._record(appointment.id, "synced", event_id=event_id)

    async def _record(
        self,
        appointment_id: int,
        state: str,
        *,
        event_id: str | None = None,
        error: str | None = None,
    ) -> bool:
        try:
            async with self._db.connection() as conn:
                await set_calendar_sync(
                    conn,
                    appointment_id=appointment_id,
                    state=state,
                    event_id=event_id,
                    error=error,
                )
        except Exception as exc:
            logger.warning(
                f"could not record calendar sync of appointment {appointment_id}: "
                f"{type(exc).__name__}"
            )
            return False
        return state == "synced"

    def event_for(self, appointment: AppointmentRow, *, first_name: str, vehicle: str) -> Event:
        """The event that mirrors ``appointment``.

        Args:
            appointment: The appointment.
            first_name: Customer's first name.
            vehicle: Vehicle description.

        Returns:
            A transparent event in the dealership's time zone, with the appointment id
            and confirmation code as private extended properties.
        """
        services = []
        for code in appointment.service_codes:
            service = self._profile.service(code)
            services.append(service.spoken_name if service else code.replace("_", " "))
        what = ", ".join(services) or "Service"
        summary = " - ".join(p for p in (what[:1].upper() + what[1:], first_name, vehicle) if p)
        tz = self._profile.time_zone
        description = "\n".join(
            line
            for line in (
                f"Confirmation code: {appointment.confirmation_code}",
                f"Bay: {appointment.bay_id}",
                f"Transportation: {appointment.transportation.replace('_', ' ')}"
                if appointment.transportation
                else "",
                f"Appointment #{appointment.id}, booked by the phone agent.",
            )
            if line
        )
        return Event(
            summary,
            start=appointment.starts_at.astimezone(tz).replace(microsecond=0),
            end=appointment.ends_at.astimezone(tz).replace(microsecond=0),
            timezone=tz.key,
            description=description,
            transparency=Transparency.TRANSPARENT,
            extendedProperties={
                "private": {
                    APPOINTMENT_PROPERTY: str(appointment.id),
                    CODE_PROPERTY: appointment.confirmation_code,
                }
            },
        )

    async def find_event(
        self, *, appointment_id: int, confirmation_code: str, around: datetime
    ) -> str | None:
        """The id of the event already mirroring an appointment, if any.

        Args:
            appointment_id: Appointment id.
            confirmation_code: Its confirmation code.
            around: Its start; events within :data:`SEARCH_WINDOW` of it are searched.

        Returns:
            The event id, or ``None``.
        """
        filters = [
            f"{APPOINTMENT_PROPERTY}={appointment_id}",
            f"{CODE_PROPERTY}={confirmation_code}",
        ]
        events = await self._call(
            lambda c: list(
                c.get_events(
                    time_min=around - SEARCH_WINDOW,
                    time_max=around + SEARCH_WINDOW,
                    timezone=self._tz_name,
                    privateExtendedProperty=filters,
                )
            )
        )
        return events[0].event_id if events else None

    async def _previous_event_id(self, appointment_id: int) -> str | None:
        """Event of the appointment a rescheduled one replaces."""
        async with self._db.connection() as conn:
            mirror = await calendar_mirror(conn, appointment_id)
        if mirror is None:
            return None
        if mirror.external_event_id:
            return mirror.external_event_id
        return await self.find_event(
            appointment_id=appointment_id,
            confirmation_code=mirror.confirmation_code,
            around=mirror.starts_at,
        )

    async def _upsert_event(
        self, appointment: AppointmentRow, first_name: str, vehicle: str
    ) -> str | None:
        event = self.event_for(appointment, first_name=first_name, vehicle=vehicle)
        event_id = appointment.external_event_id or await self.find_event(
            appointment_id=appointment.id,
            confirmation_code=appointment.confirmation_code,
            around=appointment.starts_at,
        )
        if event_id is None and appointment.rescheduled_from_id is not None:
            event_id = await self._previous_event_id(appointment.rescheduled_from_id)
        if event_id is not None:
            event.event_id = event_id
            try:
                updated = await self._call(lambda c: c.update_event(event))
            except HttpError as exc:
                if not _is_gone(exc):
                    raise
                event.event_id = None  # deleted in Google: mirror it again
            else:
                return updated.event_id
        created = await self._call(lambda c: c.add_event(event))
        return created.event_id

    async def _remove_event(self, appointment: AppointmentRow) -> str | None:
        event_id = appointment.external_event_id or await self.find_event(
            appointment_id=appointment.id,
            confirmation_code=appointment.confirmation_code,
            around=appointment.starts_at,
        )
        if event_id is None:
            return None
        try:
            event = await self._call(lambda c: c.get_event(event_id))
        except HttpError as exc:
            if _is_gone(exc):
                return event_id
            raise
        if event.other.get("status") == "cancelled":
            return event_id
        private = (event.other.get("extendedProperties") or {}).get("private") or {}
        if private.get(APPOINTMENT_PROPERTY) != str(appointment.id):
            return event_id  # handed over to the appointment that replaced this one
        try:
            await self._call(lambda c: c.delete_event(event_id))
        except HttpError as exc:
            if not _is_gone(exc):
                raise
        return event_id


async def sync_pending(
    db: AsyncConnectionPool,
    calendar: GoogleCalendar,
    *,
    limit: int = 100,
    min_age: timedelta = timedelta(minutes=2),
) -> int:
    """Mirror appointments whose calendar sync is ``pending`` or ``failed``.

    Nothing is lost while Google is down: bookings stand with a pending or failed sync
    state, and this catches them up. Rows changed less than ``min_age`` ago are left
    to the sync their own booking is still running.

    Args:
        db: Connection pool.
        calendar: The Google backend.
        limit: At most this many appointments per run, oldest first.
        min_age: Only rows last updated at least this long ago.

    Returns:
        How many appointments were synced.
    """
    async with db.connection() as conn:
        rows = await pending_calendar_syncs(conn, min_age=min_age, limit=limit)
    synced = 0
    for row in rows:
        if await calendar.sync_appointment(
            row.appointment, first_name=row.first_name, vehicle=row.vehicle
        ):
            synced += 1
    if rows:
        logger.info(f"calendar catch-up: {synced} of {len(rows)} appointments synced")
    return synced


async def sync_forever(
    db: AsyncConnectionPool,
    calendar: GoogleCalendar,
    *,
    interval_s: float = 60.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Run :func:`sync_pending` every ``interval_s`` seconds until ``stop`` is set.

    Args:
        db: Connection pool.
        calendar: The Google backend.
        interval_s: Pause between runs.
        stop: Ends the loop when set; runs until cancelled when omitted.
    """
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            await sync_pending(db, calendar)
        except Exception as exc:  # the database may be briefly unavailable
            logger.warning(f"calendar catch-up failed: {type(exc).__name__}")
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass

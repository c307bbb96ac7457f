"""Text messages in SQL: consent, opt-outs, the outbox, delivery status, reminders, replies.

Outbound texts are ``messages`` rows. Queueing inserts a row and notifies the senders
(``pg_notify('sms_outbox')``, delivered at commit). A sender first sweeps the due rows
that must not go out (opted-out number, no consent, expired, appointment changed) and
then claims ONE sendable row at a time with ``FOR UPDATE SKIP LOCKED`` (queued ->
sending), re-checking opt-out and consent at that moment; two senders never send the same
row. Appointment texts are unique per (appointment, kind), so re-planning never texts
anyone twice; a transient failure is retried once, as a new row with ``retry_of``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from psycopg import AsyncConnection
from psycopg.rows import class_row

from crm.campaigns import _CALLABLE, _WINDOW_CTES, _WINDOW_OK, _ZONE_JOINS, CallRules

#: Channel the senders LISTEN on.
OUTBOX_CHANNEL = "sms_outbox"
#: Appointment statuses a booking, reschedule or reminder text still makes sense for.
LIVE_STATUSES = ("requested", "scheduled", "confirmed")
#: How long a text waiting for its call's consent answer is pushed back each sweep.
CONSENT_WAIT = timedelta(seconds=5)
#: Final delivery statuses of Twilio -> ours.
FINAL_STATUSES = {"delivered": "delivered", "undelivered": "undelivered", "failed": "failed"}

_NOTIFY = "SELECT pg_notify('sms_outbox', '')"
_OPTED_OUT = "EXISTS (SELECT 1 FROM sms_opt_outs o WHERE o.phone = m.phone)"
_EXPIRED = "(m.expires_at IS NOT NULL AND m.expires_at <= %(now)s)"
# An appointment text whose appointment no longer fits it (a booking text for a visit
# cancelled since, a reminder for a moved visit).
_STALE_APPOINTMENT = (
    "(m.kind NOT IN ('reply', 'cancelled') AND COALESCE(ap.status, 'gone') <> ALL(%(live)s))"
)
_CONSENTED = "(m.kind = 'reply' OR COALESCE(c.sms_consent, false))"
# Consent unknown, the text's call still going: wait for the bot's question.
_WAITING_FOR_ANSWER = """
    (m.kind <> 'reply' AND c.id IS NOT NULL AND NOT c.sms_consent AND c.sms_consent_at IS NULL
     AND m.call_sid IS NOT NULL AND m.hold_until > %(now)s
     AND NOT EXISTS (SELECT 1 FROM calls cl
                     WHERE cl.call_sid = m.call_sid AND cl.ended_at IS NOT NULL))"""
_SENDABLE = f"NOT {_EXPIRED} AND NOT {_OPTED_OUT} AND NOT {_STALE_APPOINTMENT} AND {_CONSENTED}"


@dataclass(frozen=True)
class ConsentState:
    """A customer's consent to texts.

    Attributes:
        consent: Whether texts may be sent.
        known: Whether the answer was ever recorded (or imported as a yes).
        opted_out: Whether the customer's number texted STOP.
    """

    consent: bool
    known: bool
    opted_out: bool


@dataclass(frozen=True)
class ClaimedText:
    """An outbound text this process now owns for one send."""

    id: int
    kind: str
    phone: str
    body: str | None
    customer_id: int | None
    appointment_id: int | None
    retry_of: int | None


@dataclass(frozen=True)
class TextFacts:
    """What an appointment text says, and what it must never say."""

    kind: str
    first_name: str | None
    starts_at: datetime | None
    service_codes: list[str] | None
    confirmation_code: str | None
    appointment_status: str | None
    vehicle_year: int | None
    vehicle_make: str | None
    vehicle_model: str | None
    date_of_birth: date | None
    vins: list[str]


@dataclass(frozen=True)
class StatusResult:
    """A message after a delivery status was applied."""

    id: int
    kind: str
    phone: str
    status: str
    error_code: int | None
    retry_of: int | None


@dataclass(frozen=True)
class ReplyTarget:
    """Who an inbound text is from, and their nearest upcoming appointment (if any)."""

    customer_id: int
    first_name: str
    appointment_id: int | None
    appointment_status: str | None
    starts_at: datetime | None
    service_codes: list[str] | None
    confirmation_code: str | None


@dataclass(frozen=True)
class FailedText:
    """A text that failed, for ops (no body, the number is masked by the caller)."""

    id: int
    kind: str
    phone: str
    customer_id: int | None
    appointment_id: int | None
    status: str
    error_code: int | None
    error: str | None
    twilio_sid: str | None
    retry_of: int | None
    retried_by: int | None
    retry_status: str | None
    created_at: datetime
    updated_at: datetime


# --- consent and opt-outs ----------------------------------------------------------------


async def consent_state(conn: AsyncConnection, customer_id: int) -> ConsentState | None:
    """The customer's consent to texts, or ``None`` for an unknown customer."""
    cur = await conn.execute(
        """
        SELECT c.sms_consent, c.sms_consent OR c.sms_consent_at IS NOT NULL,
               EXISTS (SELECT 1 FROM sms_opt_outs o WHERE o.phone = c.phone)
        FROM customers c WHERE c.id = %(id)s
        """,
        {"id": customer_id},
    )
    row = await cur.fetchone()
    return ConsentState(bool(row[0]), bool(row[1]), bool(row[2])) if row else None


async def record_consent(
    conn: AsyncConnection, *, customer_id: int, consent: bool, call_sid: str, now: datetime
) -> None:
    """Store the customer's answer to "Can I text you?" with its time and call.

    Texts of this call waiting for the answer become due at once (a yes sends them, a
    no skips them).
    """
    await conn.execute(
        """
        UPDATE customers SET sms_consent = %(consent)s, sms_consent_at = %(now)s,
               sms_consent_call_sid = left(%(sid)s, 64)
        WHERE id = %(id)s
        """,
        {"id": customer_id, "consent": consent, "now": now, "sid": call_sid},
    )
    await conn.execute(
        """
        UPDATE messages SET not_before = %(now)s
        WHERE status = 'queued' AND customer_id = %(id)s AND not_before > %(now)s
          AND kind <> 'reply'
        """,
        {"id": customer_id, "now": now},
    )
    await conn.execute(_NOTIFY)


async def opt_out(conn: AsyncConnection, *, phone: str, keyword: str) -> bool:
    """Record that ``phone`` must not be texted; ``True`` when it was not opted out yet."""
    cur = await conn.execute(
        """
        INSERT INTO sms_opt_outs (phone, keyword) VALUES (%(phone)s, left(%(kw)s, 20))
        ON CONFLICT (phone) DO NOTHING
        """,
        {"phone": phone, "kw": keyword},
    )
    return bool(cur.rowcount)


async def opt_in(conn: AsyncConnection, *, phone: str) -> bool:
    """Remove ``phone``'s opt-out (START); ``True`` when it was opted out."""
    cur = await conn.execute("DELETE FROM sms_opt_outs WHERE phone = %(phone)s", {"phone": phone})
    return bool(cur.rowcount)


async def is_opted_out(conn: AsyncConnection, phone: str) -> bool:
    """Whether ``phone`` texted STOP (and not START since)."""
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM sms_opt_outs WHERE phone = %(phone)s)", {"phone": phone}
    )
    row = await cur.fetchone()
    return bool(row and row[0])


# --- queueing -----------------------------------------------------------------------------


async def queue_appointment_text(
    conn: AsyncConnection,
    *,
    appointment_id: int,
    kind: str,
    call_sid: str | None,
    now: datetime,
    hold: timedelta,
    expires_after: timedelta,
) -> int | None:
    """Queue the text about a change to an appointment (``booked``, ``rescheduled``,
    ``cancelled``), to the appointment's customer's phone.

    Args:
        conn: Database connection (the change's transaction: the text is queued with it).
        appointment_id: The appointment.
        kind: ``booked``, ``rescheduled`` or ``cancelled``.
        call_sid: The call that made the change.
        now: The current instant.
        hold: How long the text may wait for the call's consent answer.
        expires_after: A text not sent by then is dropped (it would come too late).

    Returns:
        The new message id, or ``None`` when this appointment already has this text.
    """
    cur = await conn.execute(
        """
        INSERT INTO messages (direction, kind, customer_id, appointment_id, phone, call_sid,
                              hold_until, not_before, expires_at)
        SELECT 'outbound', %(kind)s, c.id, ap.id, c.phone, %(sid)s, %(now)s + %(hold)s,
               %(now)s, CASE WHEN %(kind)s = 'cancelled' THEN %(now)s + %(expiry)s
                             ELSE least(%(now)s + %(expiry)s, ap.starts_at) END
        FROM appointments ap JOIN customers c ON c.id = ap.customer_id
        WHERE ap.id = %(id)s
        ON CONFLICT (appointment_id, kind)
            WHERE appointment_id IS NOT NULL AND retry_of IS NULL AND direction = 'outbound'
            DO NOTHING
        RETURNING id
        """,
        {
            "id": appointment_id,
            "kind": kind,
            "sid": call_sid,
            "now": now,
            "hold": hold,
            "expiry": expires_after,
        },
    )
    row = await cur.fetchone()
    if row:
        await conn.execute(_NOTIFY)
    return int(row[0]) if row else None


async def queue_reply(
    conn: AsyncConnection,
    *,
    phone: str,
    customer_id: int | None,
    body: str,
    now: datetime,
    expires_after: timedelta = timedelta(hours=1),
) -> int:
    """Queue our answer to an inbound text (no consent needed; opt-outs still apply)."""
    cur = await conn.execute(
        """
        INSERT INTO messages (direction, kind, customer_id, phone, body, not_before, expires_at)
        VALUES ('outbound', 'reply', %(cid)s, %(phone)s, %(body)s, %(now)s, %(now)s + %(exp)s)
        RETURNING id
        """,
        {"cid": customer_id, "phone": phone, "body": body, "now": now, "exp": expires_after},
    )
    row = await cur.fetchone()
    assert row is not None
    await conn.execute(_NOTIFY)
    return int(row[0])


async def record_inbound(
    conn: AsyncConnection, *, sid: str, phone: str, body: str, customer_id: int | None
) -> int | None:
    """Store an inbound text once per MessageSid; ``None`` when it was already stored
    (Twilio retried the webhook)."""
    cur = await conn.execute(
        """
        INSERT INTO messages (direction, kind, customer_id, phone, body, status, twilio_sid,
                              twilio_status)
        VALUES ('inbound', 'inbound', %(cid)s, %(phone)s, left(%(body)s, 1600), 'received',
                %(sid)s, 'received')
        ON CONFLICT (twilio_sid) DO NOTHING
        RETURNING id
        """,
        {"cid": customer_id, "phone": phone, "body": body, "sid": sid},
    )
    row = await cur.fetchone()
    return int(row[0]) if row else None


async def queue_due_reminders(
    conn: AsyncConnection,
    *,
    now: datetime,
    rules: CallRules,
    lead_hours: tuple[int, ...],
    cutoff_minutes: int,
    limit: int = 5000,
) -> list[int]:
    """Queue every reminder due now, once per (appointment, kind).

    A reminder ``reminder_<N>h`` is due from N hours before a scheduled or confirmed
    appointment until the next (smaller) reminder is due, the last one until
    ``cutoff_minutes`` before the visit. It is queued only for a customer who agreed to
    texts, whose number did not opt out, at a moment inside the customer-local send window
    (``rules.customer_window``, in the customer's time zone: their own, their state's, or
    the dealership's), and only when the appointment already existed when it became due
    (a booking made 20 hours ahead gets its confirmation, not a 24-hour reminder).

    Args:
        conn: Database connection.
        now: The current instant.
        rules: Time zones and the send window (``customer_window``).
        lead_hours: Reminder leads, any order.
        cutoff_minutes: No reminder closer to the visit than this.
        limit: At most this many new reminders in one call.

    Returns:
        Ids of the messages queued by this call.
    """
    if not lead_hours:
        return []
    params = rules.params(now) | {
        "leads": sorted(lead_hours, reverse=True),
        "max_lead": max(lead_hours),
        "cutoff": cutoff_minutes,
        "live": ["scheduled", "confirmed"],
        "limit": limit,
    }
    cur = await conn.execute(
        f"""
        WITH {_WINDOW_CTES},
        leads AS (
            SELECT h AS hours, lead(h) OVER (ORDER BY h DESC) AS next_hours
            FROM unnest(%(leads)s::int[]) AS h
        ),
        due AS (
            SELECT ap.id AS appointment_id, c.id AS customer_id, c.phone, l.hours,
                   CASE WHEN l.next_hours IS NULL
                        THEN ap.starts_at - make_interval(mins => %(cutoff)s)
                        ELSE ap.starts_at - make_interval(hours => l.next_hours)
                   END AS expires_at
            FROM appointments ap
            JOIN customers c ON c.id = ap.customer_id
            CROSS JOIN leads l
            CROSS JOIN clock k
            {_ZONE_JOINS}
            WHERE ap.starts_at > %(now)s
              AND ap.starts_at <= %(now)s::timestamptz + make_interval(hours => %(max_lead)s)
              AND ap.status = ANY(%(live)s)
              AND ap.starts_at - make_interval(hours => l.hours) <= %(now)s
              AND ap.created_at < ap.starts_at - make_interval(hours => l.hours)
              AND c.sms_consent
              AND NOT EXISTS (SELECT 1 FROM sms_opt_outs o WHERE o.phone = c.phone)
              AND {_WINDOW_OK}
        )
        INSERT INTO messages (direction, kind, customer_id, appointment_id, phone, not_before,
                              expires_at)
        SELECT 'outbound', 'reminder_' || d.hours || 'h', d.customer_id, d.appointment_id,
               d.phone, %(now)s, d.expires_at
        FROM due d
        WHERE d.expires_at > %(now)s
        ORDER BY d.expires_at
        LIMIT %(limit)s
        ON CONFLICT (appointment_id, kind)
            WHERE appointment_id IS NOT NULL AND retry_of IS NULL AND direction = 'outbound'
            DO NOTHING
        RETURNING id
        """,
        params,
    )
    ids = [int(r[0]) for r in await cur.fetchall()]
    if ids:
        await conn.execute(_NOTIFY)
    return ids


# --- sending ------------------------------------------------------------------------------


async def listen_outbox(conn: AsyncConnection) -> None:
    """Subscribe an autocommit connection to the outbox notifications."""
    await conn.execute(f"LISTEN {OUTBOX_CHANNEL}")


async def sweep_outbox(
    conn: AsyncConnection, *, now: datetime, stale_after: timedelta
) -> dict[str, int]:
    """Settle due queued texts that must not go out, and texts lost while sending.

    * expired, opted-out number, appointment changed, no consent -> ``skipped`` (reason
      in ``error``);
    * consent unknown while the text's call goes on -> pushed back a few seconds;
    * ``sending`` without a MessageSid for longer than ``stale_after`` (the sender died
      mid-request: Twilio may have taken it) -> ``failed``, never sent again.

    Returns:
        Counts per outcome.
    """
    params = {"now": now, "live": list(LIVE_STATUSES), "wait": CONSENT_WAIT}
    cur = await conn.execute(
        f"""
        WITH due AS (
            SELECT m.id,
                   CASE WHEN {_EXPIRED} THEN 'expired'
                        WHEN {_OPTED_OUT} THEN 'opted out'
                        WHEN {_STALE_APPOINTMENT} THEN 'appointment changed'
                        WHEN {_WAITING_FOR_ANSWER} THEN 'wait'
                        WHEN NOT {_CONSENTED} THEN 'no consent'
                   END AS verdict
            FROM messages m
            LEFT JOIN customers c ON c.id = m.customer_id
            LEFT JOIN appointments ap ON ap.id = m.appointment_id
            WHERE m.status = 'queued' AND m.not_before <= %(now)s
            ORDER BY m.not_before, m.id
            LIMIT 1000
            FOR UPDATE OF m SKIP LOCKED
        )
        UPDATE messages m
        SET status = CASE WHEN due.verdict = 'wait' THEN 'queued' ELSE 'skipped' END,
            error = CASE WHEN due.verdict = 'wait' THEN m.error ELSE due.verdict END,
            not_before = CASE WHEN due.verdict = 'wait' THEN %(now)s::timestamptz + %(wait)s
                              ELSE m.not_before END,
            finished_at = CASE WHEN due.verdict = 'wait' THEN NULL ELSE %(now)s END
        FROM due
        WHERE m.id = due.id AND due.verdict IS NOT NULL
        RETURNING due.verdict
        """,
        params,
    )
    counts: dict[str, int] = {}
    for (verdict,) in await cur.fetchall():
        counts[verdict] = counts.get(verdict, 0) + 1
    cur = await conn.execute(
        """
        UPDATE messages SET status = 'failed', finished_at = %(now)s,
               error = 'interrupted while sending; not sent again'
        WHERE status = 'sending' AND twilio_sid IS NULL AND claimed_at < %(cutoff)s
        """,
        {"now": now, "cutoff": now - stale_after},
    )
    if cur.rowcount:
        counts["interrupted"] = cur.rowcount
    return counts


async def claim_next(conn: AsyncConnection, *, now: datetime) -> ClaimedText | None:
    """Take the next due, sendable text for one send (queued -> sending), if any.

    Atomic and ``SKIP LOCKED``: of two senders, one gets each row. The number's opt-out,
    the customer's consent, the expiry and the appointment are checked at this moment.
    """
    async with conn.cursor(row_factory=class_row(ClaimedText)) as cur:
        await cur.execute(
            f"""
            WITH next AS (
                SELECT m.id FROM messages m
                LEFT JOIN customers c ON c.id = m.customer_id
                LEFT JOIN appointments ap ON ap.id = m.appointment_id
                WHERE m.status = 'queued' AND m.not_before <= %(now)s AND {_SENDABLE}
                ORDER BY m.not_before, m.id
                LIMIT 1
                FOR UPDATE OF m SKIP LOCKED
            )
            UPDATE messages m SET status = 'sending', claimed_at = %(now)s
            FROM next WHERE m.id = next.id
            RETURNING m.id, m.kind, m.phone, m.body, m.customer_id, m.appointment_id,
                      m.retry_of
            """,
            {"now": now, "live": list(LIVE_STATUSES)},
        )
        return await cur.fetchone()


async def text_facts(conn: AsyncConnection, message_id: int) -> TextFacts | None:
    """The appointment, vehicle and customer facts a text is written from."""
    async with conn.cursor(row_factory=class_row(TextFacts)) as cur:
        await cur.execute(
            """
            SELECT m.kind, c.first_name, ap.starts_at, ap.service_codes,
                   ap.confirmation_code, ap.status AS appointment_status,
                   v.year AS vehicle_year, v.make AS vehicle_make, v.model AS vehicle_model,
                   c.date_of_birth,
                   COALESCE((SELECT array_agg(x.vin) FROM vehicles x
                             WHERE x.customer_id = m.customer_id), '{}') AS vins
            FROM messages m
            LEFT JOIN customers c ON c.id = m.customer_id
            LEFT JOIN appointments ap ON ap.id = m.appointment_id
            LEFT JOIN vehicles v ON v.id = ap.vehicle_id
            WHERE m.id = %(id)s
            """,
            {"id": message_id},
        )
        return await cur.fetchone()


async def still_sendable(conn: AsyncConnection, *, message_id: int, now: datetime) -> bool:
    """Whether a claimed text may still go out (the number did not opt out meanwhile)."""
    cur = await conn.execute(
        f"""
        SELECT NOT {_OPTED_OUT} AND NOT {_EXPIRED} FROM messages m
        WHERE m.id = %(id)s AND m.status = 'sending'
        """,
        {"id": message_id, "now": now},
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def release_claim(
    conn: AsyncConnection, *, message_id: int, reason: str, now: datetime
) -> None:
    """A claimed text is not sent after all (opted out meanwhile): ``skipped``."""
    await conn.execute(
        """
        UPDATE messages SET status = 'skipped', error = left(%(reason)s, 500),
               finished_at = %(now)s
        WHERE id = %(id)s AND status = 'sending'
        """,
        {"id": message_id, "reason": reason, "now": now},
    )


async def mark_sent(
    conn: AsyncConnection,
    *,
    message_id: int,
    sid: str,
    twilio_status: str,
    body: str,
    now: datetime,
) -> StatusResult | None:
    """Twilio took a claimed text: store its MessageSid and body; a reminder writes the
    appointment's ``reminded_at``. A final status that arrived before the MessageSid was
    stored is applied now.

    Returns:
        The message after a final status was applied, else ``None``.
    """
    cur = await conn.execute(
        """
        UPDATE messages SET status = 'sent', twilio_sid = %(sid)s, twilio_status = %(ts)s,
               body = %(body)s, sent_at = %(now)s
        WHERE id = %(id)s AND status = 'sending'
        RETURNING kind, appointment_id
        """,
        {"id": message_id, "sid": sid, "ts": twilio_status, "body": body, "now": now},
    )
    row = await cur.fetchone()
    if row and row[0].startswith("reminder_") and row[1] is not None:
        await conn.execute(
            "UPDATE appointments SET reminded_at = %(now)s WHERE id = %(id)s",
            {"id": row[1], "now": now},
        )
    cur = await conn.execute(
        """
        SELECT status, error_code FROM message_status_events
        WHERE twilio_sid = %(sid)s AND status = ANY(%(final)s)
        ORDER BY received_at DESC LIMIT 1
        """,
        {"sid": sid, "final": list(FINAL_STATUSES)},
    )
    early = await cur.fetchone()
    if early is None:
        return None
    return await _apply_status(conn, sid=sid, status=early[0], error_code=early[1], now=now)


async def mark_send_failed(
    conn: AsyncConnection, *, message_id: int, code: int | None, error: str, now: datetime
) -> StatusResult | None:
    """Twilio refused a claimed text (or could not be reached): ``failed``."""
    async with conn.cursor(row_factory=class_row(StatusResult)) as cur:
        await cur.execute(
            """
            UPDATE messages SET status = 'failed', error_code = %(code)s,
                   error = left(%(error)s, 500), finished_at = %(now)s
            WHERE id = %(id)s AND status = 'sending'
            RETURNING id, kind, phone, status, error_code, retry_of
            """,
            {"id": message_id, "code": code, "error": error, "now": now},
        )
        return await cur.fetchone()


async def queue_retry(
    conn: AsyncConnection, *, message_id: int, not_before: datetime
) -> int | None:
    """Queue the one retry of a failed original text (never a retry of a retry).

    Returns:
        The retry's id, or ``None`` when the text already has one or is itself a retry.
    """
    cur = await conn.execute(
        """
        INSERT INTO messages (direction, kind, customer_id, appointment_id, phone, body,
                              call_sid, retry_of, not_before, expires_at)
        SELECT 'outbound', m.kind, m.customer_id, m.appointment_id, m.phone, m.body,
               m.call_sid, m.id, %(nb)s, m.expires_at
        FROM messages m
        WHERE m.id = %(id)s AND m.retry_of IS NULL AND m.direction = 'outbound'
          AND m.status IN ('failed', 'undelivered')
        ON CONFLICT (retry_of) DO NOTHING
        RETURNING id
        """,
        {"id": message_id, "nb": not_before},
    )
    row = await cur.fetchone()
    if row:
        await conn.execute(_NOTIFY)
    return int(row[0]) if row else None


async def _apply_status(
    conn: AsyncConnection, *, sid: str, status: str, error_code: int | None, now: datetime
) -> StatusResult | None:
    final = FINAL_STATUSES.get(status)
    async with conn.cursor(row_factory=class_row(StatusResult)) as cur:
        if final is None:
            await cur.execute(
                """
                UPDATE messages SET twilio_status = %(st)s
                WHERE twilio_sid = %(sid)s AND direction = 'outbound' AND status = 'sent'
                RETURNING id, kind, phone, status, error_code, retry_of
                """,
                {"sid": sid, "st": status},
            )
        else:
            await cur.execute(
                """
                UPDATE messages SET status = %(final)s, twilio_status = %(st)s,
                       error_code = COALESCE(%(code)s, error_code), finished_at = %(now)s
                WHERE twilio_sid = %(sid)s AND direction = 'outbound'
                  AND status IN ('sending', 'sent')
                RETURNING id, kind, phone, status, error_code, retry_of
                """,
                {"sid": sid, "st": status, "final": final, "code": error_code, "now": now},
            )
        return await cur.fetchone()


async def apply_status_callback(
    conn: AsyncConnection, *, sid: str, status: str, error_code: int | None, now: datetime
) -> StatusResult | None:
    """Record a Twilio message status callback once and move the message forward.

    Final statuses (delivered, undelivered, failed) are applied once; a message already
    final is never moved again (callbacks may arrive out of order or twice).

    Returns:
        The message when this callback changed it, else ``None``.
    """
    cur = await conn.execute(
        """
        INSERT INTO message_status_events (twilio_sid, status, error_code)
        VALUES (left(%(sid)s, 64), left(%(st)s, 32), %(code)s)
        ON CONFLICT DO NOTHING
        """,
        {"sid": sid, "st": status, "code": error_code},
    )
    if not cur.rowcount:
        return None
    return await _apply_status(conn, sid=sid, status=status, error_code=error_code, now=now)


async def failed_texts(conn: AsyncConnection, *, limit: int = 100) -> list[FailedText]:
    """The latest failed or undelivered texts, with their retry (if any)."""
    async with conn.cursor(row_factory=class_row(FailedText)) as cur:
        await cur.execute(
            """
            SELECT m.id, m.kind, m.phone, m.customer_id, m.appointment_id, m.status,
                   m.error_code, m.error, m.twilio_sid, m.retry_of, r.id AS retried_by,
                   r.status AS retry_status, m.created_at, m.updated_at
            FROM messages m
            LEFT JOIN messages r ON r.retry_of = m.id
            WHERE m.status IN ('failed', 'undelivered')
            ORDER BY m.updated_at DESC, m.id DESC
            LIMIT %(limit)s
            """,
            {"limit": limit},
        )
        return await cur.fetchall()


# --- replies ------------------------------------------------------------------------------


async def reply_target(conn: AsyncConnection, *, phone: str, now: datetime) -> ReplyTarget | None:
    """The customer an inbound text is from, by number (primary or alternate).

    A household sharing the number: the customer with the nearest upcoming scheduled or
    confirmed appointment; without any, the customer whose own phone it is.
    """
    async with conn.cursor(row_factory=class_row(ReplyTarget)) as cur:
        await cur.execute(
            """
            SELECT c.id AS customer_id, c.first_name, ap.id AS appointment_id,
                   ap.status AS appointment_status, ap.starts_at, ap.service_codes,
                   ap.confirmation_code
            FROM customers c
            LEFT JOIN LATERAL (
                SELECT a.id, a.status, a.starts_at, a.service_codes, a.confirmation_code
                FROM appointments a
                WHERE a.customer_id = c.id AND a.status IN ('scheduled', 'confirmed')
                  AND a.starts_at > %(now)s
                ORDER BY a.starts_at
                LIMIT 1
            ) ap ON true
            WHERE c.phone = %(phone)s OR c.alt_phone = %(phone)s
            ORDER BY ap.starts_at NULLS LAST, (c.phone = %(phone)s) DESC, c.id
            LIMIT 1
            """,
            {"phone": phone, "now": now},
        )
        return await cur.fetchone()


async def confirm_by_text(conn: AsyncConnection, *, appointment_id: int, now: datetime) -> bool:
    """Confirm a scheduled appointment (``C`` reply); ``False`` when it was not scheduled."""
    cur = await conn.execute(
        """
        UPDATE appointments SET status = 'confirmed', confirmed_at = %(now)s
        WHERE id = %(id)s AND status = 'scheduled'
        """,
        {"id": appointment_id, "now": now},
    )
    return bool(cur.rowcount)


async def queue_reschedule_call(
    conn: AsyncConnection,
    *,
    customer_id: int,
    appointment_id: int,
    now: datetime,
    rules: CallRules,
    reason: str,
) -> int | None:
    """Ask the campaign worker to call the customer back now (``R`` reply), if it may.

    Inserts a ``confirmation`` campaign attempt due at once (the worker's retry pass
    dials it, in the confirmation scenario: the bot reads the appointment back and moves
    it). Only when the customer may be called right now (do-not-call, consent, lock, both
    calling windows), the appointment is scheduled and unconfirmed, and no confirmation
    attempt exists for the customer today.

    Returns:
        The attempt id, or ``None`` when the bot cannot call (an advisor must).
    """
    params = rules.params(now) | {
        "cid": customer_id,
        "aid": appointment_id,
        "reason": reason,
    }
    cur = await conn.execute(
        f"""
        WITH {_WINDOW_CTES}
        INSERT INTO campaign_attempts (campaign, customer_id, appointment_id, vehicle_id,
                                       local_date, reason, status, next_attempt_at,
                                       planned_at)
        SELECT 'confirmation', c.id, ap.id, ap.vehicle_id, k.today, left(%(reason)s, 200),
               'retry_pending', %(now)s, %(now)s
        FROM customers c
        JOIN appointments ap ON ap.id = %(aid)s AND ap.customer_id = c.id
        CROSS JOIN clock k
        {_ZONE_JOINS}
        WHERE c.id = %(cid)s AND {_CALLABLE}
          AND ap.status = 'scheduled' AND ap.confirmed_at IS NULL AND ap.starts_at > %(now)s
        ON CONFLICT (campaign, customer_id, local_date) DO NOTHING
        RETURNING id
        """,
        params,
    )
    row = await cur.fetchone()
    return int(row[0]) if row else None

"""Appointment reminders by text, planned by the campaign worker on each pass.

Each ``[texting] reminder_hours`` lead (24 and 2 hours by default) is one reminder per
appointment, queued once (unique per appointment and kind, like the campaigns' attempt
rows) when it is due, inside the customer-local ``send_window`` (their time zone, their
state's, or the dealership's), for customers who agreed to texts and whose number did
not opt out. Only the worker holding the dialing lock plans; the texts go out through the
rate-limited sender, which writes the appointment's ``reminded_at``.
"""

from __future__ import annotations

from datetime import datetime, time

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from core.profile import DealershipProfile
from crm import campaigns as crm_campaigns
from crm import messages as crm_messages


def text_rules(profile: DealershipProfile) -> crm_campaigns.CallRules:
    """Time zones and the customer-local send window of texts (no dealership window)."""
    window = profile.texting.send_window
    return crm_campaigns.CallRules(
        dealer_time_zone=str(profile.time_zone),
        dealer_window=(time(0, 0), time(23, 59, 59)),
        customer_window=(window.start, window.end),
    )


async def queue_reminders(
    db: AsyncConnectionPool, *, profile: DealershipProfile, now: datetime
) -> int:
    """Queue every reminder due at ``now``; each (appointment, kind) once, ever.

    Args:
        db: Connection pool.
        profile: Dealership profile (``[texting]``).
        now: The current instant.

    Returns:
        Number of reminders queued by this call.
    """
    texting = profile.texting
    if not texting.enabled or not texting.reminder_hours:
        return 0
    async with db.connection() as conn:
        ids = await crm_messages.queue_due_reminders(
            conn,
            now=now,
            rules=text_rules(profile),
            lead_hours=texting.reminder_hours,
            cutoff_minutes=texting.reminder_cutoff_minutes,
        )
    if ids:
        logger.info(f"queued {len(ids)} appointment reminder text(s)")
    return len(ids)

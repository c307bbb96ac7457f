"""Calendar interface: where appointments are mirrored and extra busy time comes from.

The default :class:`PostgresCalendar` treats the ``appointments`` table as the calendar:
nothing to mirror, no extra busy time. The Google implementation
(:mod:`scheduling.google_calendar`) mirrors each appointment as an event and reads
free/busy; a Google failure never loses or blocks a booking: the appointment stands and
its sync state says what is left to do.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from crm.appointments import AppointmentRow


class Calendar(Protocol):
    """What scheduling needs from a calendar backend."""

    #: Sync state new appointments start with (``not_required`` or ``pending``).
    initial_sync_state: str

    async def busy(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """Shop-wide busy intervals in ``[start, end)`` beyond the appointments table."""
        ...

    async def appointment_changed(
        self, appointment: AppointmentRow, *, first_name: str, vehicle: str
    ) -> None:
        """Mirror a booked, moved or cancelled appointment (never raises)."""
        ...


class PostgresCalendar:
    """The appointments table is the calendar: nothing to mirror, nothing extra busy."""

    initial_sync_state = "not_required"

    async def busy(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """No busy time beyond the appointments table."""
        return []

    async def appointment_changed(
        self, appointment: AppointmentRow, *, first_name: str, vehicle: str
    ) -> None:
        """Nothing to mirror."""
        return None

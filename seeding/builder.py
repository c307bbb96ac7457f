"""Generates every CRM row in memory from one seeded RNG (deterministic, ids included)."""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from json import dumps as json_dumps
from typing import Any

from tqdm import tqdm

from core.profile import DealershipProfile
from crm.vin import make_vin, year_code
from seeding.catalogue import (
    CANCEL_REASONS,
    CATALOGUE,
    COLOURS,
    DEMO_CUSTOMERS,
    HISTORY_PER_VEHICLE,
    PAST_APPOINTMENT_DAYS,
    RECALL_CODES,
    STATES,
    STREET_SUFFIXES,
    TECHNICIANS,
    UPCOMING_DAYS,
    Model,
)

#: Base-36 digits of confirmation codes.
_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class SeedError(RuntimeError):
    """The seed cannot run (for example: the database already holds customers)."""


@dataclass
class _Grid:
    """Bay occupancy, so generated appointments never overlap (the database checks too)."""

    profile: DealershipProfile
    taken: dict[tuple[date, str], list[tuple[datetime, datetime]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    loaners: dict[date, int] = field(default_factory=lambda: defaultdict(int))
    full: dict[tuple[date, tuple[str, ...]], int] = field(default_factory=dict)

    def open_ranges(self, day: date) -> list[tuple[datetime, datetime]]:
        if day in self.profile.holidays:
            return []
        weekday = day.strftime("%A").lower()
        tz = self.profile.time_zone
        return [
            (datetime.combine(day, r.start, tz), datetime.combine(day, r.end, tz))
            for r in self.profile.hours.get(weekday, ())
        ]

    def is_open(self, day: date) -> bool:
        return bool(self.open_ranges(day))

    def reserve(self, day: date, bay: str, start: datetime, end: datetime) -> bool:
        intervals = self.taken[(day, bay)]
        i = bisect.bisect_left(intervals, (start, end))
        if i > 0 and intervals[i - 1][1] > start:
            return False
        if i < len(intervals) and intervals[i][0] < end:
            return False
        intervals.insert(i, (start, end))
        return True

    def place(
        self, rng: random.Random, day: date, duration: int, bays: list[str]
    ) -> tuple[str, datetime, datetime] | None:
        """A free cell on ``day`` for ``duration`` minutes in one of ``bays`` (random order)."""
        key = (day, tuple(bays))
        if duration >= self.full.get(key, 10**6):
            return None
        cells: list[tuple[str, datetime]] = []
        for open_start, open_end in self.open_ranges(day):
            t = open_start
            while t + timedelta(minutes=duration) <= open_end:
                cells.extend((bay, t) for bay in bays)
                t += timedelta(minutes=60)
        rng.shuffle(cells)
        for bay, start in cells:
            end = start + timedelta(minutes=duration)
            if self.reserve(day, bay, start, end):
                return bay, start, end
        self.full[key] = duration
        return None


def _confirmation_code(appointment_id: int) -> str:
    """Unique 6-character code per id (a bijection on ids below 36**6)."""
    n = (appointment_id * 2_654_435_761 + 1_234_567) % 36**6
    digits = []
    for _ in range(6):
        n, r = divmod(n, 36)
        digits.append(_B36[r])
    return "".join(reversed(digits))


def _name_pools(seed: int) -> tuple[list[str], list[str], list[str]]:
    """First names, last names and street names (Faker's en_US data, seeded)."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    first = sorted({fake.first_name() for _ in range(3000)})
    last = sorted({fake.last_name() for _ in range(3000)})
    streets = sorted({fake.street_name().split(" ")[0] for _ in range(1500)})
    return first, last, streets


class CrmBuilder:
    """Generates every row in memory, in id order, from one seeded RNG."""

    def __init__(
        self, *, profile: DealershipProfile, seed: int, anchor: date, progress: bool = False
    ) -> None:
        self.profile = profile
        self.progress = progress
        self.rng = random.Random(seed)
        self.anchor = anchor
        self.now = datetime.combine(anchor, dtime(8, 0), profile.time_zone).astimezone(UTC)
        self.grid = _Grid(profile)
        self.first_names, self.last_names, self.streets = _name_pools(seed)
        self.customers: list[tuple[Any, ...]] = []
        self.vehicles: list[tuple[Any, ...]] = []
        self.history: list[list[Any]] = []
        self.appointments: list[tuple[Any, ...]] = []
        self.serial = 0
        self.advisors = [a.name for a in profile.advisors] or ["Service desk"]
        self.services = profile.services
        self.bays_for: dict[str, list[str]] = {
            code: [b.id for b in profile.bays if s.capability in b.capabilities]
            for code, s in profile.services.items()
        }
        # vehicles eligible for an upcoming appointment: (customer_id, vehicle_id)
        self.fleet: list[tuple[int, int]] = []
        # most recent service per vehicle: (date, vehicle_id, customer_id, history index)
        self.recent: list[tuple[date, int, int, int]] = []

    # -- helpers ---------------------------------------------------------------------------

    def _phone(self, index: int, area: int) -> str:
        n = (index * 7_919 + 104_729) % 8_000_000
        return f"+1{area}{200 + n // 10_000}{n % 10_000:04d}"

    def _state(self) -> tuple[Any, ...]:
        return self.rng.choices(STATES, weights=[s[1] for s in STATES])[0]

    def _price(self, code: str) -> float:
        service = self.services.get(code)
        if service is None:
            return round(self.rng.uniform(40, 200), 2)
        return round(self.rng.uniform(service.price_min, service.price_max), 2)

    def _service_mix(self, n: int) -> list[str]:
        services = ["oil_change"]
        if n % 2 == 1 and "tire_rotation" in self.services:
            services.append("tire_rotation")
        if n % 4 == 3 and "brake_inspection" in self.services:
            services.append("brake_inspection")
        if self.rng.random() < 0.25 and "multipoint_inspection" in self.services:
            services.append("multipoint_inspection")
        return services

    # -- rows ------------------------------------------------------------------------------

    def add_customer(self, **values: Any) -> int:
        cid = len(self.customers) + 1
        self.customers.append(
            (
                cid,
                values["first_name"],
                values["last_name"],
                values["phone"],
                values.get("alt_phone"),
                values.get("email"),
                values.get("address_line1"),
                values.get("city"),
                values.get("state"),
                values["zip_code"],
                values["date_of_birth"],
                values.get("preferred_language", "en"),
                values.get("preferred_contact_method", "phone"),
                values.get("call_consent", True),
                values.get("sms_consent", False),
                values.get("marketing_consent", False),
                values.get("do_not_call", False),
                values.get("failed_attempts", 0),
                values.get("locked_until"),
                values.get("last_verified_at"),
                values["customer_since"],
                values.get("time_zone"),
            )
        )
        return cid

    def add_vehicle(
        self,
        *,
        customer_id: int,
        model: Model,
        year: int,
        trim: str,
        vin: str | None = None,
        current_mileage: int | None = None,
        colour: str | None = None,
        recall: tuple[str, ...] | None = None,
        due_in_days: int | None = None,
        state: str = "IL",
    ) -> int:
        rng = self.rng
        vid = len(self.vehicles) + 1
        if vin is None:
            self.serial += 1
            plant = "ABCDEFGHJK"[self.serial // 1_000_000]
            vin = make_vin(
                wmi=model.wmi,
                vds=model.vds,
                year_code=year_code(year),
                plant=plant,
                serial=f"{self.serial % 1_000_000:06d}",
            )
        # In service from the autumn before the model year to a year after it.
        start = date(year - 1, 10, 1) + timedelta(days=rng.randint(0, 450))
        start = min(start, self.anchor - timedelta(days=45))
        age_days = (self.anchor - start).days
        if current_mileage is not None:
            rate = max(current_mileage - 10, 100) / max(age_days, 1)
            odometer0 = 10
        else:
            rate = rng.uniform(18.0, 52.0)
            odometer0 = rng.randint(3, 60)

        def miles_on(day: date) -> int:
            return int(odometer0 + rate * (day - start).days)

        interval = max(60, min(182, int(5_000 / rate)))
        visits: list[date] = []
        day = start + timedelta(days=interval + rng.randint(-10, 10))
        while day < self.anchor - timedelta(days=2):
            visits.append(day)
            day += timedelta(days=interval + rng.randint(-12, 12))
        first_visit = max(0, len(visits) - HISTORY_PER_VEHICLE)
        history_index = -1
        for n, visit in enumerate(visits[first_visit:], start=first_visit):
            if visit.weekday() == 6:  # closed on Sundays
                visit -= timedelta(days=1)
            codes = self._service_mix(n)
            costs = [self._price(c) for c in codes]
            labour = round(sum(costs) * 0.6, 2)
            parts_cost = round(sum(costs) - labour, 2)
            self.history.append(
                [
                    len(self.history) + 1,
                    vid,
                    None,  # appointment_id, filled when a past appointment is made
                    visit,
                    miles_on(visit),
                    codes,
                    rng.choice(TECHNICIANS),
                    rng.choice(self.advisors),
                    round(0.4 * len(codes) + rng.choice((0, 0.25, 0.5)), 2),
                    json_dumps([{"part": "oil filter", "qty": 1}] if "oil_change" in codes else []),
                    labour,
                    parts_cost,
                    round(labour + parts_cost, 2),
                    visit < start + timedelta(days=365 * model.warranty_years)
                    and "brake_inspection" in codes
                    and rng.random() < 0.2,
                    None,
                ]
            )
            history_index = len(self.history) - 1
        last_visit = visits[-1] if visits else None
        read_on = last_visit or start
        if current_mileage is None:
            current_mileage = miles_on(read_on)
        last_miles = miles_on(last_visit) if last_visit else None
        if last_visit is not None and last_miles is not None:
            base_day, base_miles = last_visit, last_miles
        else:
            base_day, base_miles = start, odometer0
        due_date = base_day + timedelta(days=182)
        due_miles = base_miles + 5_000
        if due_in_days is not None:
            due_date = self.anchor + timedelta(days=due_in_days)
        if recall is None:
            recall = (rng.choice(RECALL_CODES),) if rng.random() < 0.04 else ()
        plate = f"{state}-{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(10_000, 99_999)}"
        self.vehicles.append(
            (
                vid,
                customer_id,
                vin,
                year,
                model.make,
                model.model,
                trim,
                rng.choice(model.engines),
                colour or rng.choice(COLOURS),
                plate,
                current_mileage,
                read_on,
                start + timedelta(days=365 * model.warranty_years),
                model.warranty_miles,
                last_visit,
                last_miles,
                due_date,
                due_miles,
                list(recall),
            )
        )
        self.fleet.append((customer_id, vid))
        if history_index >= 0 and last_visit is not None:
            self.recent.append((last_visit, vid, customer_id, history_index))
        return vid

    def add_appointment(
        self,
        *,
        customer_id: int,
        vehicle_id: int,
        codes: list[str],
        status: str,
        bay: str,
        starts_at: datetime,
        ends_at: datetime,
        source: str,
    ) -> int:
        rng = self.rng
        aid = len(self.appointments) + 1
        day = starts_at.date()
        transport = rng.choices(("waiter", "drop_off", "shuttle", "loaner"), (5, 3, 1, 1))[0]
        if transport == "loaner":
            if self.grid.loaners[day] >= self.profile.loaner_cars:
                transport = "drop_off"
            else:
                self.grid.loaners[day] += 1
        created = min(starts_at.astimezone(UTC) - timedelta(days=rng.randint(1, 20)), self.now)
        confirmed_at = (
            created + timedelta(hours=2) if status in ("confirmed", "completed") else None
        )
        cancelled_at = created + timedelta(days=1) if status == "cancelled" else None
        self.appointments.append(
            (
                aid,
                customer_id,
                vehicle_id,
                codes,
                status,
                starts_at.astimezone(UTC),
                ends_at.astimezone(UTC),
                bay,
                rng.choice(self.advisors),
                transport,
                transport == "loaner",
                source,
                _confirmation_code(aid),
                confirmed_at,
                cancelled_at,
                rng.choice(CANCEL_REASONS) if cancelled_at else None,
                created,
            )
        )
        return aid

    def duration(self, codes: list[str]) -> int:
        total = sum(self.services[c].duration_minutes for c in codes if c in self.services)
        return max(30, min(total or 60, 120))

    # -- the whole data set ----------------------------------------------------------------

    def demo_customers(self) -> None:
        tz = self.profile.time_zone
        for demo in DEMO_CUSTOMERS:
            cid = self.add_customer(
                first_name=demo.first_name,
                last_name=demo.last_name,
                phone=demo.phone,
                alt_phone=demo.alt_phone,
                email=f"{demo.first_name.lower()}.{demo.last_name.lower()}@example.com",
                address_line1=f"{100 + len(self.customers)} W Fullerton Ave",
                city="Chicago",
                state="IL",
                zip_code=demo.zip_code,
                date_of_birth=demo.date_of_birth,
                do_not_call=demo.do_not_call,
                call_consent=not demo.do_not_call,
                sms_consent=True,
                failed_attempts=3 if demo.locked else 0,
                locked_until=self.now + timedelta(days=30) if demo.locked else None,
                customer_since=date(2015, 3, 1),
                time_zone="America/Chicago",
            )
            vehicle_ids = []
            for v in demo.vehicles:
                model = next(m for m in CATALOGUE if (m.make, m.model) == (v.make, v.model))
                vehicle_ids.append(
                    self.add_vehicle(
                        customer_id=cid,
                        model=model,
                        year=v.year,
                        trim=v.trim,
                        vin=v.vin,
                        current_mileage=v.mileage,
                        colour=v.colour,
                        recall=v.recall,
                        due_in_days=v.due_in_days,
                    )
                )
            if demo.upcoming and vehicle_ids:
                day = self.anchor + timedelta(days=1)
                while not self.grid.is_open(day):
                    day += timedelta(days=1)
                open_start = self.grid.open_ranges(day)[0][0]
                start = max(open_start, datetime.combine(day, dtime(9, 0), tz))
                end = start + timedelta(minutes=self.duration([demo.upcoming]))
                bay = self.bays_for[demo.upcoming][0]
                assert self.grid.reserve(day, bay, start, end)
                self.add_appointment(
                    customer_id=cid,
                    vehicle_id=vehicle_ids[-1],
                    codes=[demo.upcoming],
                    status="scheduled",
                    bay=bay,
                    starts_at=start,
                    ends_at=end,
                    source="phone_inbound",
                )
        self.fleet.clear()  # demo customers get no random appointments
        self.recent.clear()

    def generated_customers(self, count: int) -> None:
        rng = self.rng
        first_id = len(self.customers) + 1
        household: tuple[Any, ...] | None = None
        bar = tqdm(range(count), desc="customers", disable=not self.progress, leave=False)
        for i in bar:
            state, _, tz, areas, zips, cities = self._state()
            first = rng.choice(self.first_names)
            last = rng.choice(self.last_names)
            city_index = rng.randrange(len(cities))
            street = f"{rng.randint(100, 9999)} {rng.choice(self.streets)} "
            street += rng.choice(STREET_SUFFIXES)
            zip_code = f"{zips[city_index % len(zips)]}{rng.randint(0, 99):02d}"
            alt_phone = None
            if household is not None and rng.random() < 0.03:
                # Shares the previous customer's household: their number, name and address.
                alt_phone, last, street, zip_code, state, tz, city_index, cities = household
            age = rng.randint(19, 86)
            dob = self.anchor - timedelta(days=365 * age + rng.randint(0, 364))
            roll = rng.random()
            locked = roll < 0.005
            cid = self.add_customer(
                first_name=first,
                last_name=last,
                phone=self._phone(first_id + i, rng.choice(areas)),
                alt_phone=alt_phone,
                email=(
                    f"{first.lower()}.{last.lower()}{i % 97}@example.{rng.choice(('com', 'net'))}"
                    if rng.random() < 0.85
                    else None
                ),
                address_line1=street,
                city=cities[city_index],
                state=state,
                zip_code=zip_code,
                date_of_birth=dob,
                preferred_language="es" if rng.random() < 0.1 else "en",
                preferred_contact_method=rng.choices(("phone", "sms", "email"), (6, 3, 1))[0],
                call_consent=rng.random() >= 0.04,
                sms_consent=rng.random() < 0.55,
                marketing_consent=rng.random() < 0.3,
                do_not_call=rng.random() < 0.03,
                failed_attempts=3 if locked else rng.choices((0, 1), (9, 1))[0],
                locked_until=self.now + timedelta(minutes=rng.randint(5, 60 * 24 * 7))
                if locked
                else None,
                last_verified_at=(
                    self.now - timedelta(days=rng.randint(1, 900)) if rng.random() < 0.6 else None
                ),
                customer_since=self.anchor - timedelta(days=rng.randint(30, 20 * 365)),
                time_zone=tz,
            )
            household = (
                self.customers[-1][3],
                last,
                street,
                zip_code,
                state,
                tz,
                city_index,
                cities,
            )
            n_vehicles = rng.choices((0, 1, 2, 3), (2, 60, 30, 8))[0]
            for _ in range(n_vehicles):
                model = rng.choice(CATALOGUE)
                year = rng.randint(max(model.first_year, self.anchor.year - 14), self.anchor.year)
                self.add_vehicle(
                    customer_id=cid,
                    model=model,
                    year=year,
                    trim=rng.choice(model.trims),
                    state=state,
                )

    def past_appointments(self) -> None:
        """Completed (and some cancelled / no-show) appointments for recent services."""
        rng = self.rng
        horizon = self.anchor - timedelta(days=PAST_APPOINTMENT_DAYS)
        recent = sorted(r for r in self.recent if r[0] >= horizon)
        for day, vehicle_id, customer_id, history_index in recent:
            codes = [c for c in self.history[history_index][5] if c in self.bays_for]
            codes = codes[:1] or ["oil_change"]
            bays = self.bays_for.get(codes[0])
            if not bays or not self.grid.is_open(day):
                continue
            cell = self.grid.place(rng, day, self.duration(codes), bays)
            if cell is None:
                continue  # the shop was full that day: a walk-in without a booking
            bay, start, end = cell
            aid = self.add_appointment(
                customer_id=customer_id,
                vehicle_id=vehicle_id,
                codes=codes,
                status="completed",
                bay=bay,
                starts_at=start,
                ends_at=end,
                source=rng.choices(
                    ("phone_inbound", "web", "walk_in", "phone_outbound"), (5, 3, 1, 1)
                )[0],
            )
            self.history[history_index][2] = aid
            if rng.random() < 0.06:
                # Someone else booked a slot that day and did not come, or cancelled.
                other = rng.choice(self.fleet)
                cell = self.grid.place(rng, day, 60, bays)
                if cell is not None:
                    self.add_appointment(
                        customer_id=other[0],
                        vehicle_id=other[1],
                        codes=codes,
                        status=rng.choice(("no_show", "cancelled")),
                        bay=cell[0],
                        starts_at=cell[1],
                        ends_at=cell[2],
                        source="phone_inbound",
                    )

    def upcoming_appointments(self, customers: int) -> None:
        """Scheduled and confirmed appointments over the next weeks (about 40% of capacity)."""
        rng = self.rng
        if not self.fleet:
            return
        days = [self.anchor + timedelta(days=d) for d in range(1, UPCOMING_DAYS + 1)]
        days = [d for d in days if self.grid.is_open(d)]
        wanted = max(3, customers // 10)
        capacity = sum(
            int((end - start).total_seconds() // 3600) * len(self.profile.bays)
            for d in days
            for start, end in self.grid.open_ranges(d)
        )
        wanted = min(wanted, int(capacity * 0.4))
        owners = rng.sample(self.fleet, min(wanted, len(self.fleet)))
        codes_pool = [
            c
            for c in (
                "oil_change",
                "tire_rotation",
                "brake_inspection",
                "alignment",
                "diagnostics",
                "multipoint_inspection",
            )
            if c in self.bays_for
        ]
        tomorrow = days[0] if days else None
        for customer_id, vehicle_id in owners:
            code = rng.choice(codes_pool)
            day = rng.choice(days)
            cell = self.grid.place(rng, day, self.duration([code]), self.bays_for[code])
            if cell is None:
                continue
            status = "confirmed" if rng.random() < 0.35 else "scheduled"
            if day == tomorrow and rng.random() < 0.6:
                status = "scheduled"
            self.add_appointment(
                customer_id=customer_id,
                vehicle_id=vehicle_id,
                codes=[code],
                status=status,
                bay=cell[0],
                starts_at=cell[1],
                ends_at=cell[2],
                source=rng.choices(("phone_inbound", "web", "phone_outbound"), (5, 3, 1))[0],
            )

"""Deterministic mock CRM data: customers, vehicles, service history and appointments.

Usage::

    python seed_data.py --customers 100000 --seed 7 [--reset] [--anchor-date 2026-11-30]

Loads into ``DATABASE_URL`` (or, when it is unset, the embedded server under ``DATA_DIR``).
The same seed, customer count and anchor date always produce the same rows, ids included.
``--anchor-date`` is "today" for the data (default: today in the dealership's time zone):
service histories end before it and upcoming appointments start after it.

What it makes:

* the named demo customers of :data:`DEMO_CUSTOMERS` (ids 1-7, listed in the README), so a
  person can try the bot by phone or at ``/client``;
* ``N`` generated customers with 0-3 vehicles each (valid, unique VINs; plausible make,
  model, trim and year), mileage that grows steadily with the vehicle's age, service
  histories, past and upcoming appointments packed onto the bays without overlap;
* edge cases: shared household numbers (``alt_phone``), customers with no vehicle, locked
  verification, do-not-call, no call consent, expired warranties and open recalls.

Rows go in with ``COPY`` (explicit ids, sequences moved past them afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from json import dumps as json_dumps
from pathlib import Path
from typing import Any

import psycopg
from tqdm import tqdm

from app.profile import DealershipProfile, load_profile
from crm.vin import make_vin, year_code

#: Base-36 digits of confirmation codes.
_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: Where the generated customers live: state, weight, time zone, area codes, ZIP prefixes.
STATES: tuple[tuple[str, int, str, tuple[int, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "IL",
        70,
        "America/Chicago",
        (312, 773, 872, 847, 630, 708),
        ("606", "602", "605", "604"),
        ("Chicago", "Evanston", "Naperville", "Oak Park", "Skokie", "Schaumburg"),
    ),
    (
        "WI",
        5,
        "America/Chicago",
        (414, 262, 608),
        ("531", "532", "537"),
        ("Milwaukee", "Kenosha", "Madison"),
    ),
    (
        "IN",
        5,
        "America/Indiana/Indianapolis",
        (317, 219, 574),
        ("462", "463", "465"),
        ("Indianapolis", "Gary", "South Bend"),
    ),
    (
        "MI",
        3,
        "America/Detroit",
        (313, 248, 616),
        ("482", "480", "495"),
        ("Detroit", "Troy", "Grand Rapids"),
    ),
    (
        "NY",
        4,
        "America/New_York",
        (212, 718, 917),
        ("100", "112", "104"),
        ("New York", "Brooklyn", "Bronx"),
    ),
    (
        "FL",
        4,
        "America/New_York",
        (305, 407, 813),
        ("331", "328", "336"),
        ("Miami", "Orlando", "Tampa"),
    ),
    (
        "TX",
        3,
        "America/Chicago",
        (214, 713, 512),
        ("752", "770", "787"),
        ("Dallas", "Houston", "Austin"),
    ),
    ("CO", 2, "America/Denver", (303, 720), ("802", "803"), ("Denver", "Boulder")),
    ("AZ", 2, "America/Phoenix", (602, 480), ("850", "852"), ("Phoenix", "Mesa")),
    (
        "CA",
        2,
        "America/Los_Angeles",
        (213, 310, 415),
        ("900", "902", "941"),
        ("Los Angeles", "Santa Monica", "San Francisco"),
    ),
)


@dataclass(frozen=True)
class Model:
    """A catalogue vehicle: how its VINs start and what it looks like."""

    make: str
    model: str
    wmi: str
    vds: str
    trims: tuple[str, ...]
    engines: tuple[str, ...]
    first_year: int
    warranty_years: int = 3
    warranty_miles: int = 36_000


CATALOGUE: tuple[Model, ...] = (
    Model(
        "Toyota", "Camry", "4T1", "B11HK", ("LE", "SE", "XLE", "XSE"), ("2.5L I4", "3.5L V6"), 2012
    ),
    Model("Toyota", "Corolla", "2T1", "BURHE", ("L", "LE", "SE"), ("1.8L I4", "2.0L I4"), 2012),
    Model(
        "Toyota", "RAV4", "2T3", "W1RFV", ("LE", "XLE", "Limited"), ("2.5L I4", "2.5L Hybrid"), 2013
    ),
    Model(
        "Toyota",
        "Tacoma",
        "5TF",
        "AZ5CN",
        ("SR", "SR5", "TRD Off-Road"),
        ("2.7L I4", "3.5L V6"),
        2014,
    ),
    Model(
        "Honda",
        "Civic",
        "2HG",
        "FC2F5",
        ("LX", "Sport", "EX", "Touring"),
        ("2.0L I4", "1.5L Turbo I4"),
        2012,
    ),
    Model(
        "Honda",
        "Accord",
        "1HG",
        "CV1F3",
        ("LX", "Sport", "EX-L"),
        ("1.5L Turbo I4", "2.0L Hybrid"),
        2012,
    ),
    Model(
        "Honda", "CR-V", "7FA", "RW2H5", ("LX", "EX", "EX-L", "Touring"), ("1.5L Turbo I4",), 2013
    ),
    Model(
        "Ford",
        "F-150",
        "1FT",
        "EW1EP",
        ("XL", "XLT", "Lariat"),
        ("2.7L EcoBoost V6", "5.0L V8"),
        2012,
    ),
    Model(
        "Ford",
        "Explorer",
        "1FM",
        "5K8GC",
        ("Base", "XLT", "Limited"),
        ("2.3L EcoBoost I4", "3.0L V6"),
        2013,
    ),
    Model(
        "Ford",
        "Escape",
        "1FM",
        "CU9GD",
        ("S", "SE", "Titanium"),
        ("1.5L EcoBoost I3", "2.0L I4"),
        2013,
    ),
    Model(
        "Chevrolet",
        "Silverado 1500",
        "1GC",
        "UYDED",
        ("WT", "LT", "RST"),
        ("5.3L V8", "2.7L Turbo I4"),
        2012,
    ),
    Model(
        "Chevrolet", "Equinox", "2GN", "AXKEV", ("LS", "LT", "Premier"), ("1.5L Turbo I4",), 2012
    ),
    Model("Chevrolet", "Malibu", "1G1", "ZD5ST", ("LS", "LT", "Premier"), ("1.5L Turbo I4",), 2012),
    Model(
        "Hyundai",
        "Elantra",
        "5NP",
        "D84LF",
        ("SE", "SEL", "Limited"),
        ("2.0L I4",),
        2013,
        5,
        60_000,
    ),
    Model(
        "Hyundai", "Tucson", "KM8", "J3CA4", ("SE", "SEL", "Limited"), ("2.5L I4",), 2014, 5, 60_000
    ),
    Model(
        "Kia",
        "Sorento",
        "5XY",
        "PGDA5",
        ("LX", "S", "EX"),
        ("2.5L I4", "2.5L Turbo I4"),
        2014,
        5,
        60_000,
    ),
    Model("Nissan", "Altima", "1N4", "BL4BV", ("S", "SV", "SR"), ("2.5L I4",), 2012),
    Model("Nissan", "Rogue", "5N1", "AT3BB", ("S", "SV", "SL"), ("2.5L I4", "1.5L Turbo I3"), 2013),
    Model("Subaru", "Outback", "4S4", "BSANC", ("Base", "Premium", "Limited"), ("2.5L H4",), 2012),
    Model(
        "Jeep",
        "Grand Cherokee",
        "1C4",
        "RJFAG",
        ("Laredo", "Limited", "Overland"),
        ("3.6L V6",),
        2012,
    ),
)
COLOURS = ("white", "black", "silver", "grey", "blue", "red", "green", "beige", "brown")
RECALL_CODES = ("24V-118", "24V-702", "25V-042", "25V-311", "26V-095")
TECHNICIANS = ("T. Nguyen", "R. Alvarez", "S. Brooks", "K. Iyer", "M. Novak", "J. Okoye")
STREET_SUFFIXES = ("St", "Ave", "Blvd", "Rd", "Ln", "Dr", "Ct", "Pl")
CANCEL_REASONS = ("schedule conflict", "sold the vehicle", "went elsewhere", "feeling unwell")
HISTORY_PER_VEHICLE = 4  # most recent services kept per vehicle
PAST_APPOINTMENT_DAYS = 120  # past appointments are made for services in this window
UPCOMING_DAYS = 30


@dataclass(frozen=True)
class DemoVehicle:
    """A demo customer's vehicle."""

    year: int
    make: str
    model: str
    trim: str
    vin: str
    mileage: int
    colour: str
    due_in_days: int  # next service due relative to the anchor date (negative: overdue)
    recall: tuple[str, ...] = ()


@dataclass(frozen=True)
class DemoCustomer:
    """A named customer a person can play when trying the bot."""

    first_name: str
    last_name: str
    phone: str
    date_of_birth: date
    zip_code: str
    note: str
    vehicles: tuple[DemoVehicle, ...] = ()
    alt_phone: str | None = None
    do_not_call: bool = False
    locked: bool = False
    upcoming: str | None = None  # service code of an appointment on the next open day


def _demo_vin(wmi: str, vds: str, year: int, serial: str) -> str:
    return make_vin(wmi=wmi, vds=vds, year_code=year_code(year), plant="D", serial=serial)


#: The demo customers (README lists them). Ids 1..7 in this order.
DEMO_CUSTOMERS: tuple[DemoCustomer, ...] = (
    DemoCustomer(
        "Maria",
        "Garcia",
        "+15555550100",
        date(1985, 4, 12),
        "60614",
        "oil change overdue",
        (
            DemoVehicle(
                2021,
                "Toyota",
                "Camry",
                "SE",
                _demo_vin("4T1", "B11HK", 2021, "900001"),
                41_250,
                "blue",
                -5,
            ),
        ),
    ),
    DemoCustomer(
        "James",
        "Carter",
        "+15555550101",
        date(1979, 9, 30),
        "60201",
        "two vehicles; a tire rotation booked on the next open day, not yet confirmed",
        (
            DemoVehicle(
                2019,
                "Ford",
                "F-150",
                "XLT",
                _demo_vin("1FT", "EW1EP", 2019, "900002"),
                68_400,
                "white",
                40,
            ),
            DemoVehicle(
                2022,
                "Honda",
                "CR-V",
                "EX",
                _demo_vin("7FA", "RW2H5", 2022, "900003"),
                22_900,
                "grey",
                75,
            ),
        ),
        upcoming="tire_rotation",
    ),
    DemoCustomer(
        "Priya",
        "Patel",
        "+15555550102",
        date(1990, 1, 22),
        "60657",
        "open recall, warranty expired",
        (
            DemoVehicle(
                2017,
                "Honda",
                "Accord",
                "EX-L",
                _demo_vin("1HG", "CV1F3", 2017, "900004"),
                97_800,
                "silver",
                20,
                ("25V-042",),
            ),
        ),
    ),
    DemoCustomer(
        "Daniel",
        "Kim",
        "+15555550103",
        date(1972, 6, 3),
        "60626",
        "household number shared with Grace Kim",
        (
            DemoVehicle(
                2020,
                "Subaru",
                "Outback",
                "Premium",
                _demo_vin("4S4", "BSANC", 2020, "900005"),
                55_100,
                "green",
                10,
            ),
        ),
    ),
    DemoCustomer(
        "Grace",
        "Kim",
        "+15555550104",
        date(1975, 11, 19),
        "60626",
        "reachable on the household number +15555550103 as well",
        (
            DemoVehicle(
                2023,
                "Hyundai",
                "Tucson",
                "SEL",
                _demo_vin("KM8", "J3CA4", 2023, "900006"),
                14_300,
                "red",
                60,
            ),
        ),
        alt_phone="+15555550103",
    ),
    DemoCustomer(
        "Robert",
        "Johnson",
        "+15555550105",
        date(1968, 2, 27),
        "60540",
        "verification locked after failed attempts: the bot hands over to a person",
        (
            DemoVehicle(
                2018,
                "Chevrolet",
                "Equinox",
                "LT",
                _demo_vin("2GN", "AXKEV", 2018, "900007"),
                83_000,
                "black",
                30,
            ),
        ),
        locked=True,
    ),
    DemoCustomer(
        "Susan",
        "Miller",
        "+15555550106",
        date(1959, 8, 8),
        "60091",
        "no vehicle on file, do-not-call",
        do_not_call=True,
    ),
)


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


class _Builder:
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
        base_day, base_miles = (last_visit, last_miles) if last_visit else (start, odometer0)
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


CUSTOMER_COLUMNS = (
    "id, first_name, last_name, phone, alt_phone, email, address_line1, city, state, zip_code, "
    "date_of_birth, preferred_language, preferred_contact_method, call_consent, sms_consent, "
    "marketing_consent, do_not_call, verification_failed_attempts, verification_locked_until, "
    "last_verified_at, customer_since, time_zone"
)
VEHICLE_COLUMNS = (
    "id, customer_id, vin, year, make, model, trim, engine, colour, plate, current_mileage, "
    "mileage_read_at, warranty_end_date, warranty_end_miles, last_service_date, "
    "last_service_mileage, next_service_due_date, next_service_due_mileage, open_recall_codes"
)
APPOINTMENT_COLUMNS = (
    "id, customer_id, vehicle_id, service_codes, status, starts_at, ends_at, bay_id, advisor, "
    "transportation, loaner_reserved, source, confirmation_code, confirmed_at, cancelled_at, "
    "cancel_reason, created_at"
)
HISTORY_COLUMNS = (
    "id, vehicle_id, appointment_id, service_date, mileage, services_performed, technician, "
    "advisor, labour_hours, parts, labour_cost, parts_cost, total_cost, warranty, notes"
)
CRM_TABLES = ("customers", "vehicles", "appointments", "service_history")


def _load(conninfo: str, builder: _Builder, *, reset: bool, progress: bool = False) -> None:
    """COPY the rows in one transaction (blocking: run it in a thread)."""
    with psycopg.connect(conninfo) as conn:
        with conn.transaction():
            if reset:
                conn.execute(
                    "TRUNCATE customers, vehicles, appointments, service_history "
                    "RESTART IDENTITY CASCADE"
                )
            else:
                existing = conn.execute("SELECT count(*) FROM customers").fetchone()
                if existing and existing[0]:
                    raise SeedError(
                        f"the database already holds {existing[0]} customers; pass --reset "
                        "to replace the CRM data"
                    )
            tables = (
                ("customers", CUSTOMER_COLUMNS, builder.customers),
                ("vehicles", VEHICLE_COLUMNS, builder.vehicles),
                ("appointments", APPOINTMENT_COLUMNS, builder.appointments),
                ("service_history", HISTORY_COLUMNS, builder.history),
            )
            total = sum(len(rows) for _, _, rows in tables)
            bar = tqdm(total=total, desc="rows", disable=not progress, leave=False)
            with conn.cursor() as cur, bar:
                for table, columns, rows in tables:
                    with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                            bar.update()
                for table in CRM_TABLES:
                    cur.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT COALESCE(max(id), 0) + 1 FROM {table}), false)"
                    )
        conn.execute("ANALYZE customers, vehicles, appointments, service_history")


async def seed(
    conninfo: str,
    *,
    customers: int,
    seed: int = 7,
    reset: bool = False,
    anchor_date: date | None = None,
    profile: DealershipProfile | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """Load the demo customers plus ``customers`` generated ones into a migrated database.

    Args:
        conninfo: Postgres connection string (the migrations are applied first).
        customers: How many customers to generate besides the demo ones.
        seed: RNG seed; the same seed, count and anchor date give the same rows.
        reset: Replace existing CRM rows (otherwise a non-empty CRM is an error).
        anchor_date: "Today" for the data; default today in the dealership's time zone.
        profile: Dealership profile (hours, bays, services); default the configured one.
        progress: Show progress bars on stderr (the command line does on a terminal).

    Returns:
        Row counts per table.

    Raises:
        SeedError: The CRM already has customers and ``reset`` is false.
    """
    from crm.migrate import apply_migrations

    if profile is None:
        from app.settings import get_settings

        profile = load_profile(get_settings().dealership_profile)
    anchor = anchor_date or datetime.now(profile.time_zone).date()
    await apply_migrations(conninfo)

    def build() -> _Builder:
        builder = _Builder(profile=profile, seed=seed, anchor=anchor, progress=progress)
        builder.demo_customers()
        builder.generated_customers(customers)
        builder.past_appointments()
        builder.upcoming_appointments(customers)
        return builder

    builder = await asyncio.to_thread(build)
    await asyncio.to_thread(_load, conninfo, builder, reset=reset, progress=progress)
    return {
        "customers": len(builder.customers),
        "vehicles": len(builder.vehicles),
        "service_history": len(builder.history),
        "appointments": len(builder.appointments),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=200, help="generated customers")
    parser.add_argument("--seed", type=int, default=7, help="RNG seed (default 7)")
    parser.add_argument("--reset", action="store_true", help="replace existing CRM rows")
    parser.add_argument(
        "--anchor-date", type=date.fromisoformat, default=None, help="today for the data"
    )
    args = parser.parse_args(argv)
    if args.customers < 0:
        parser.error("--customers must be >= 0")

    async def run() -> dict[str, int]:
        from app.settings import get_settings

        settings = get_settings()
        if settings.database_url:
            return await seed(
                settings.database_url,
                customers=args.customers,
                seed=args.seed,
                reset=args.reset,
                anchor_date=args.anchor_date,
                progress=sys.stderr.isatty(),
            )
        from app.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres()
        await pg.astart(Path(settings.data_dir) / "postgres")
        try:
            return await seed(
                pg.url,
                customers=args.customers,
                seed=args.seed,
                reset=args.reset,
                anchor_date=args.anchor_date,
                progress=sys.stderr.isatty(),
            )
        finally:
            await pg.astop()

    started = time.perf_counter()
    try:
        counts = asyncio.run(run())
    except SeedError as exc:
        print(f"seed_data: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"seed_data: cannot reach Postgres ({exc}). Check DATABASE_URL.", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    summary = ", ".join(f"{count} {table}" for table, count in counts.items())
    print(f"seeded {summary} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

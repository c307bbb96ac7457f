"""The mock CRM's catalogue: states, vehicle models, and the named demo customers.

The demo customers (ids 1-7) are listed in the README so a person can try the bot.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from crm.vin import make_vin, year_code

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

"""Vehicle identification numbers (ISO 3779 / 49 CFR 565): check digit and validation."""

from __future__ import annotations

import re

VIN_RE = re.compile(r"^[A-HJ-NPR-Z0-9]{17}$")
_TRANSLITERATION = {
    **{str(d): d for d in range(10)},
    **dict(zip("ABCDEFGH", range(1, 9), strict=True)),
    **dict(zip("JKLMN", range(1, 6), strict=True)),
    "P": 7,
    "R": 9,
    **dict(zip("STUVWXYZ", range(2, 10), strict=True)),
}
_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)
#: Model-year codes (position 10), 30-year cycle starting 1980 / 2010.
YEAR_CODES = "ABCDEFGHJKLMNPRSTVWXY123456789"


def check_digit(vin: str) -> str:
    """The check digit (position 9) a VIN must have.

    Args:
        vin: 17 characters; position 9 is ignored.

    Returns:
        ``"0"``-``"9"`` or ``"X"``.
    """
    total = sum(_TRANSLITERATION[c] * w for c, w in zip(vin.upper(), _WEIGHTS, strict=True))
    remainder = total % 11
    return "X" if remainder == 10 else str(remainder)


def is_valid_vin(vin: str) -> bool:
    """Whether ``vin`` has the VIN alphabet, 17 characters and a correct check digit."""
    return bool(VIN_RE.match(vin or "")) and vin[8] == check_digit(vin)


def year_code(year: int) -> str:
    """Model-year code of position 10 for ``year`` (1980-2039)."""
    return YEAR_CODES[(year - 1980) % 30]


def make_vin(*, wmi: str, vds: str, year_code: str, plant: str, serial: str) -> str:
    """Assemble a valid VIN from its parts, computing the check digit.

    Args:
        wmi: World manufacturer identifier (3 characters).
        vds: Vehicle descriptor section (5 characters, positions 4-8).
        year_code: Model-year code (position 10).
        plant: Plant code (position 11).
        serial: Production serial (6 characters).

    Returns:
        The 17-character VIN.

    Raises:
        ValueError: A part has the wrong length or a letter VINs do not use (I, O, Q).
    """
    body = f"{wmi}{vds}0{year_code}{plant}{serial}".upper()
    if len(wmi) != 3 or len(vds) != 5 or len(plant) != 1 or len(serial) != 6:
        raise ValueError("VIN parts have the wrong length")
    if not VIN_RE.match(body):
        raise ValueError("VIN parts contain characters VINs do not use")
    return body[:8] + check_digit(body) + body[9:]

"""Masking helpers: no phone number, name, date of birth or VIN goes into log text as is."""

from __future__ import annotations


def mask_phone(phone: str | None) -> str:
    """Mask a phone number, keeping the country code and the last 4 digits.

    Args:
        phone: A phone number, ideally E.164.

    Returns:
        e.g. ``+1***…4567``; ``<none>`` for an empty value.
    """
    if not phone:
        return "<none>"
    digits = phone.strip()
    if digits.startswith("+1") and len(digits) > 6:
        return f"+1***…{digits[-4:]}"
    if digits.startswith("+") and len(digits) > 6:
        return f"{digits[:2]}***…{digits[-4:]}"
    return "***"


def mask_vin(vin: str | None) -> str:
    """Mask a VIN down to its last 4 characters (``…1234``)."""
    return f"…{vin[-4:]}" if vin else "<none>"


def mask_name(name: str | None) -> str:
    """Mask a name down to its initial (``J.``)."""
    return f"{name.strip()[0]}." if name and name.strip() else "<none>"

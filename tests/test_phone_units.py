"""Pieces of the phone features that need no call: TwiML, whisper, summary template,
language settings, and the ``calls`` rules of migration 0050."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.features import stt_language, tts_voice
from bot.handover import whisper_text
from bot.summary import CallSummary, SummaryFacts, template_summary
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE, Settings
from crm.phone import AppointmentBrief
from telephony.twiml import say_twiml, spoken_digits, warm_transfer_twiml

PROFILE = load_profile(DEFAULT_PROFILE)


def test_warm_transfer_twiml_holds_dials_and_whispers() -> None:
    twiml = warm_transfer_twiml(
        number="+15555550142",
        hold_message="Please hold & wait.",
        whisper_url="https://agent.example.com/twilio/transfer/whisper?call_sid=CA1&x=<y>",
        action_url="https://agent.example.com/twilio/transfer/status",
        ring_secs=25,
        language="es",
    )
    root = ET.fromstring(twiml)
    say, dial = list(root)
    assert say.text == "Please hold & wait." and say.get("language") == "es-MX"
    assert dial.get("timeout") == "25" and dial.get("method") == "POST"
    number = dial.find("Number")
    assert number is not None and number.text == "+15555550142"
    assert number.get("url", "").endswith("call_sid=CA1&x=<y>")  # escaped, then parsed back


@given(message=st.text(max_size=200))
def test_say_twiml_is_well_formed_for_any_text(message: str) -> None:
    cleaned = "".join(ch for ch in message if ch.isprintable())
    root = ET.fromstring(say_twiml(cleaned, hang_up=True))
    assert [el.tag for el in root] == ["Say", "Hangup"]
    assert (root[0].text or "") == cleaned


def test_numbers_are_spoken_digit_by_digit() -> None:
    assert spoken_digits("+15555550199") == "5 5 5, 5 5 5, 0 1 9 9"
    assert spoken_digits("+442071838750") == "4 4 2 0 7 1 8 3 8 7 5 0"


def test_whispers() -> None:
    assert (
        whisper_text(
            name="Maria Garcia",
            vehicle="2021 Camry",
            reason="wants to move Tuesday's oil change.",
            verified=True,
            language="en",
        )
        == "Maria Garcia, 2021 Camry, wants to move Tuesday's oil change; verified."
    )
    assert whisper_text(name=None, vehicle=None, reason="", verified=False, language="es") == (
        "Unidentified caller, asked for a service advisor; not verified. The caller speaks Spanish."
    )
    assert (
        len(whisper_text(name="A", vehicle=None, reason="x" * 2000, verified=True, language="en"))
        <= 600
    )


def test_template_summary_from_the_facts() -> None:
    booked = AppointmentBrief(
        id=7,
        status="scheduled",
        service_codes=["oil_change"],
        starts_at=datetime(2026, 12, 1, 15, 0, tzinfo=UTC),
        confirmation_code="K7Q2XD",
        year=2021,
        make="Toyota",
        model="Camry",
    )
    facts = SummaryFacts(
        direction="inbound",
        scenario="inbound",
        language="es",
        outcome="booked",
        verified=True,
        first_name="Maria",
        appointments=[booked],
        transfer_reason=None,
        callback_requested=False,
        transcript=[],
    )
    summary = template_summary(facts, PROFILE)
    assert isinstance(summary, CallSummary)
    assert summary.outcome == "An appointment was booked."
    assert summary.appointments == [
        "oil change for the 2021 Toyota Camry on Tuesday, December 1 at 9:00 AM "
        "(scheduled, code K7Q2XD)"
    ]
    assert summary.text.startswith("Inbound inbound call with Maria (verified, in Spanish).")
    assert summary.follow_ups == [] and summary.sentiment == "unknown"


def test_language_settings() -> None:
    settings = Settings(_env_file=None)
    assert tts_voice(settings, "es") == "aura-2-celeste-es"
    assert tts_voice(settings, "en") == settings.deepgram_tts_voice
    assert stt_language(("en",)) == "en" and stt_language(("en", "es")) == "multi"


@pytest.mark.parametrize("answered_by", ["machine_end_beep", "machine_end_silence"])
async def test_a_machine_answered_call_stays_a_voicemail(
    migrated_db: str, answered_by: str
) -> None:
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO calls (call_sid, direction, scenario, answered_by) "
            "VALUES ('CA1', 'outbound', 'service_due', %s)",
            (answered_by,),
        )
        conn.execute("UPDATE calls SET outcome = 'abandoned', ended_at = now()")
        assert conn.execute("SELECT outcome FROM calls").fetchone() == ("voicemail",)
        conn.execute(
            "INSERT INTO calls (call_sid, direction, transfer_status) VALUES ('CA2', 'inbound', "
            "'no-answer')"
        )
        conn.execute("UPDATE calls SET outcome = 'transferred' WHERE call_sid = 'CA2'")
        row = conn.execute("SELECT outcome FROM calls WHERE call_sid = 'CA2'").fetchone()
        assert row == ("callback_requested",)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE calls SET answered_by = 'robot'")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE calls SET recording_sid = 'RE123'")

"""Texts through the real server: a booking call texts its confirmation, the consent
question on a call, signed inbound-text and status webhooks, the failed-texts route, and
hostile webhook input (hypothesis).

Twilio is the REST fake (``TWILIO_API_BASE_URL``); webhooks are signed like Twilio signs
them, and the fake posts delivery status callbacks back to the server.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from seeding import seed
from tests.fakes.openai_chat import FakeOpenAI, Step, call_tool, say
from tests.harness import (
    ACCOUNT_SID,
    BOOKING_UTTERANCES,
    booking_script,
    last_tool_result,
    running_agent,
    sign,
)
from tests.test_e2e_calls import say_turn

MARIA = "+15555550100"
JAMES = "+15555550101"
DANIEL = "+15555550103"
PROFILE = load_profile(DEFAULT_PROFILE)
_sids = itertools.count(1)


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    """A small seeded CRM anchored on today's date (the demo customers included)."""
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=20, seed=7, anchor_date=today, profile=PROFILE)
    return migrated_db


def sms_form(from_: str, body: str) -> dict[str, str]:
    """The form Twilio posts to the messaging webhook for an inbound text."""
    sid = f"SM{next(_sids):032x}"
    return {
        "ToCountry": "US",
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "SmsSid": sid,
        "SmsStatus": "received",
        "Body": body,
        "To": "+15555550199",
        "NumSegments": "1",
        "MessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": from_,
        "ApiVersion": "2010-04-01",
    }


async def wait_for_texts(agent, number: str, count: int, timeout: float = 15.0) -> list[Any]:  # noqa: ASYNC109
    """The fake's texts to ``number`` once there are ``count`` of them."""
    async with asyncio.timeout(timeout):
        while True:
            texts = agent.twilio.texts_to(number)
            if len(texts) >= count:
                return texts
            await asyncio.sleep(0.05)


async def run_booking_call(agent, utterances: list[str]) -> Any:
    agent.stt.script(utterances)
    client = await agent.inbound_call(MARIA)
    await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
    await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
    for _ in range(len(utterances) - 1):
        await say_turn(client)
    await say_turn(client, expect_reply=False)
    await client.wait_closed(timeout=30)
    await agent.wait_for_call_row(client.call_sid)
    return client


async def test_a_booking_call_texts_one_confirmation(crm_db: str, redis_server_url: str) -> None:
    llm = FakeOpenAI(booking_script())
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        client = await run_booking_call(agent, BOOKING_UTTERANCES)
        [booked] = agent.query(
            "SELECT id, confirmation_code FROM appointments WHERE call_sid = %s",
            (client.call_sid,),
        )
        [text] = await wait_for_texts(agent, MARIA, 1)
        await asyncio.sleep(1.0)
        assert agent.twilio.texts_to(MARIA) == [text]  # one, and only one
        assert text.sender == "+15555550199"
        assert text.status_callback == agent.base_url + "/twilio/sms/status"
        assert booked["confirmation_code"] in text.body
        assert "oil change" in text.body and "Camry" in text.body
        assert "2400 River Road" in text.body
        vin = agent.query("SELECT vin FROM vehicles WHERE id = 1")[0]["vin"]
        assert vin not in text.body and "1985" not in text.body
        # The booking tool told the model a text is on its way (Maria agreed to texts).
        # (the last request can be the post-call summary; take the conversation's last)
        conversation = [
            r for r in agent.llm.requests if any(m.get("role") == "tool" for m in r["messages"])
        ]
        book_result = last_tool_result(conversation[-1], "book_appointment")
        assert book_result["text"] == "will_text"
        # Twilio reports the delivery; the row follows.
        assert await agent.twilio.report_status(text.sid, "delivered") == 204
        [row] = agent.query(
            "SELECT kind, status, appointment_id, call_sid FROM messages WHERE twilio_sid = %s",
            (text.sid,),
        )
        assert row == {
            "kind": "booked",
            "status": "delivered",
            "appointment_id": booked["id"],
            "call_sid": client.call_sid,
        }


def consent_script() -> list[Step]:
    """The booking script, with the consent question after the read-back."""
    steps = booking_script()
    *booking, _read_back, end = steps

    def read_back_and_ask(body: dict[str, Any]) -> Step:
        result = last_tool_result(body, "book_appointment")
        assert result["text"] == "ask_consent", result
        # The confirm node offers the consent tool and tells the model to ask.
        names = {t["function"]["name"] for t in body.get("tools", [])}
        assert "record_text_consent" in names, names
        assert any("ask_consent" in str(m.get("content")) for m in body["messages"])
        code = result["confirmation_code_spoken"]
        return say(f"You're all set, code {code}. Can I text you the confirmation?")

    return [
        *booking,
        read_back_and_ask,
        call_tool("record_text_consent", {"answer": True}),
        say("Great, I'll text it to you. Anything else?"),
        end,
    ]


async def test_the_bot_asks_for_text_consent_once_and_records_it(
    crm_db: str, redis_server_url: str
) -> None:
    llm = FakeOpenAI(consent_script())
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.query(
            "UPDATE customers SET sms_consent = false, sms_consent_at = NULL WHERE phone = %s "
            "RETURNING id",
            (MARIA,),
        )
        utterances = [*BOOKING_UTTERANCES[:3], "Yes, please text me.", BOOKING_UTTERANCES[3]]
        client = await run_booking_call(agent, utterances)
        [customer] = agent.query(
            "SELECT sms_consent, sms_consent_at, sms_consent_call_sid FROM customers "
            "WHERE phone = %s",
            (MARIA,),
        )
        assert customer["sms_consent"] is True
        assert customer["sms_consent_call_sid"] == client.call_sid
        assert customer["sms_consent_at"] is not None
        [text] = await wait_for_texts(agent, MARIA, 1)
        [code] = agent.query(
            "SELECT confirmation_code FROM appointments WHERE call_sid = %s", (client.call_sid,)
        )
        assert code["confirmation_code"] in text.body
        assert "Can I text you the confirmation?" in " ".join(agent.tts.texts)


async def test_text_replies_confirm_stop_help_and_delivery_failures(
    crm_db: str, redis_server_url: str
) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        # Unsigned or mis-signed: refused, nothing recorded.
        form = sms_form(JAMES, "C")
        assert (await agent.http.post("/twilio/sms", data=form)).status_code == 403
        bad = {"X-Twilio-Signature": sign("https://evil.example/twilio/sms", form)}
        assert (await agent.http.post("/twilio/sms", data=form, headers=bad)).status_code == 403
        status = {"MessageSid": "SM" + "1" * 32, "MessageStatus": "delivered"}
        assert (await agent.http.post("/twilio/sms/status", data=status)).status_code == 403
        assert agent.query("SELECT count(*) AS n FROM messages")[0]["n"] == 0

        # James's tire rotation is scheduled and unconfirmed: "C" confirms it.
        [before] = agent.query(
            "SELECT a.id, a.status FROM appointments a JOIN customers c ON c.id = a.customer_id "
            "WHERE c.phone = %s AND a.starts_at > now()",
            (JAMES,),
        )
        assert before["status"] == "scheduled"
        response = await agent.post_signed("/twilio/sms", sms_form(JAMES, "c"))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/xml")
        assert "<Response>" in response.text and "<Message>" not in response.text
        [after] = agent.query(
            "SELECT status, confirmed_at FROM appointments WHERE id = %s", (before["id"],)
        )
        assert after["status"] == "confirmed" and after["confirmed_at"] is not None
        [reply] = await wait_for_texts(agent, JAMES, 1)
        assert "is confirmed" in reply.body and "tire rotation" in reply.body

        # STOP: nothing more goes to Maria, while others still get answers.
        assert (await agent.post_signed("/twilio/sms", sms_form(MARIA, "STOP"))).status_code == 200
        await agent.post_signed("/twilio/sms", sms_form(MARIA, "HELP"))
        await agent.post_signed("/twilio/sms", sms_form(DANIEL, "HELP"))
        [help_reply] = await wait_for_texts(agent, DANIEL, 1)
        assert "Riverside Motors" in help_reply.body and "(555) 555-0199" in help_reply.body
        await asyncio.sleep(0.5)
        assert agent.twilio.texts_to(MARIA) == []
        assert agent.query("SELECT keyword FROM sms_opt_outs WHERE phone = %s", (MARIA,)) == [
            {"keyword": "stop"}
        ]
        # START: texts again.
        await agent.post_signed("/twilio/sms", sms_form(MARIA, "START"))
        await agent.post_signed("/twilio/sms", sms_form(MARIA, "what are your hours"))
        [options] = await wait_for_texts(agent, MARIA, 1)
        assert "Reply C to confirm" in options.body or "reply C to confirm" in options.body

        # A failed delivery is recorded, shown to ops and (transient) retried once.
        failed = await agent.twilio.report_status(reply.sid, "undelivered", error_code=30003)
        assert failed == 204
        assert (await agent.http.get("/messages/failed")).status_code == 401
        admin = {"Authorization": "Bearer e2e-admin"}
        listed = (await agent.http.get("/messages/failed", headers=admin)).json()["messages"]
        assert [(m["kind"], m["status"], m["error_code"]) for m in listed] == [
            ("reply", "undelivered", 30003)
        ]
        assert listed[0]["to"] == "+1***…0101" and listed[0]["retried_by"] is not None
        assert "body" not in listed[0]
        assert await agent.twilio.report_status(help_reply.sid, "delivered") == 204
        listed = (await agent.http.get("/messages/failed", headers=admin)).json()["messages"]
        assert len(listed) == 1
        bad_limit = await agent.http.get("/messages/failed?limit=abc", headers=admin)
        assert bad_limit.status_code == 422


PHONES = st.one_of(
    st.sampled_from([MARIA, JAMES, DANIEL, "+15555550104", "+15555550106"]),
    st.from_regex(r"\+1[2-9][0-9]{9}", fullmatch=True),
    st.text(max_size=40),
    st.just(""),
)
BODIES = st.one_of(
    st.text(),
    st.sampled_from(["C", "c", "R", "STOP", "start", "HELP", "confirm", "reschedule", "\x00C"]),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=10), st.integers(200, 3000)),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=50).map(
        lambda s: s + "\x00" + s
    ),
)


async def test_hostile_inbound_texts_never_get_a_5xx(crm_db: str, redis_server_url: str) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        url = agent.settings.public_base_url.rstrip("/") + "/twilio/sms"
        seen: list[int] = []

        def fuzz() -> None:
            with httpx.Client(base_url=agent.base_url, timeout=30) as http:

                @settings(
                    max_examples=150,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    database=None,
                )
                @given(from_=PHONES, body=BODIES)
                def post(from_: str, body: str) -> None:
                    form = sms_form(from_, body)
                    signed = http.post(
                        "/twilio/sms", data=form, headers={"X-Twilio-Signature": sign(url, form)}
                    )
                    assert signed.status_code == 200, (signed.status_code, signed.text[:200])
                    unsigned = http.post("/twilio/sms", data=form)
                    assert unsigned.status_code == 403
                    callback = {"MessageSid": body[:40], "MessageStatus": from_, "ErrorCode": body}
                    status = http.post(
                        "/twilio/sms/status",
                        data=callback,
                        headers={"X-Twilio-Signature": sign(url + "/status", callback)},
                    )
                    assert status.status_code == 204, status.status_code
                    seen.append(signed.status_code)

                post()

        await asyncio.to_thread(fuzz)
        assert len(seen) >= 100
        print(f"hostile inbound texts: {len(seen)} examples, all answered 200")
        assert (await agent.http.get("/health")).status_code == 200

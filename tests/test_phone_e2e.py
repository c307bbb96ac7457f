"""The phone features end to end, through the real server and the wire-protocol fakes:
warm transfer with a whisper, call recording, keypad input, voicemail after the beep,
Spanish, and post-call summaries.

Twilio's side is played by the fakes as Twilio plays it: the REST fake records every
request the server makes and sends the signed callbacks the server asked for (the
``<Number url>`` and ``<Dial action>`` of a transfer TwiML, recording status callbacks,
the asynchronous AMD verdict); the media-stream client is the caller's phone and is
closed when the server hands the call to other TwiML, as Twilio closes the stream.
"""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from seeding import seed
from tests.fakes.audio import speech_ulaw
from tests.fakes.openai_chat import FakeOpenAI, call_tool, say
from tests.harness import Agent, running_agent, with_summaries

MARIA = "+15555550100"
ADVISOR = "+15555550142"
PROFILE = load_profile(DEFAULT_PROFILE)
ADMIN = {"Authorization": "Bearer e2e-admin"}
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    """A small seeded CRM anchored on today's date (the demo customers included)."""
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=20, seed=7, anchor_date=today, profile=PROFILE)
    return migrated_db


def profile_file(
    tmp_path: Path,
    *,
    open_now: bool = True,
    recording: bool = False,
    phone: dict[str, Any] | None = None,
) -> str:
    """The example profile, open around the clock (or closed today), with changes."""
    text = DEFAULT_PROFILE.read_text()
    start = text.index("holidays = [")
    end = text.index("]", start) + 1
    if open_now:
        holidays = "holidays = []"
        hours_start = text.index("[hours]")
        hours_end = text.index("[", hours_start + len("[hours]"))
        always = "\n".join(f'{day} = ["00:00-24:00"]' for day in WEEKDAYS)
        text = (
            text[:start]
            + holidays
            + text[end:hours_start]
            + ("[hours]\n" + always + "\n\n" + text[hours_end:])
        )
    else:
        today = datetime.now(PROFILE.time_zone).date()
        days = ", ".join(f'"{today + timedelta(days=d)}"' for d in (-1, 0, 1))
        text = text[:start] + f"holidays = [{days}]" + text[end:]
    if recording:
        text = text.replace("recording_enabled = false", "recording_enabled = true")
    for key, value in (phone or {}).items():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{key} = "))
        text = text.replace(line, f"{key} = {json.dumps(value)}")
    path = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}.toml"
    path.write_text(text)
    return str(path)


async def say_turn(client, seconds: float = 0.8, *, expect_reply: bool = True) -> float:
    """The caller speaks one scripted utterance and (by default) waits for the reply."""
    end = await client.send_audio(speech_ulaw(seconds))
    if expect_reply:
        await client.wait_for_bot_audio(min_seconds=0.2, timeout=20, since=end)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
    return end


async def greeted(agent: Agent, caller: str = MARIA):
    """An inbound call whose greeting has been played."""
    client = await agent.inbound_call(caller)
    await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
    await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
    return client


async def wait_for_row(
    agent: Agent,
    call_sid: str,
    ready,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> dict[str, Any]:
    """The ``calls`` row once ``ready(row)`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            rows = agent.query("SELECT * FROM calls WHERE call_sid = %s", (call_sid,))
            if rows and ready(rows[0]):
                return rows[0]
            await asyncio.sleep(0.1)


async def wait_for_redirect(agent: Agent, call_sid: str, timeout: float = 20.0):  # noqa: ASYNC109
    """The REST update that gave the live call new TwiML."""
    async with asyncio.timeout(timeout):
        while True:
            for request in agent.call_updates(call_sid):
                if "Twiml" in request.form:
                    return request
            await asyncio.sleep(0.05)


def summarised(row: dict[str, Any]) -> bool:
    return row["ended_at"] is not None and row["summary_source"] is not None


# --- 1. warm transfer ---------------------------------------------------------------------

TRANSFER_REASON = "caller wants a person to move an appointment"
SO_FAR = {
    "reason": "wants to move Tuesday's oil change",
    "outcome": "In progress: transferring to an advisor.",
    "appointments": [],
    "follow_ups": [],
    "sentiment": "neutral",
    "text": "Maria called to move her oil change and asked for an advisor.",
}


async def test_warm_transfer_whispers_the_summary_to_the_advisor_then_connects(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    llm = FakeOpenAI(
        with_summaries(
            [
                say("Sure. Can you confirm your date of birth?"),
                call_tool("verify_customer", {"date_of_birth": "1985-04-12"}),
                say("Thanks, Maria, you're verified. What would you like to do?"),
                call_tool("transfer_to_advisor", {"reason": TRANSFER_REASON}),
            ],
            so_far=SO_FAR,
        )
    )
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": profile_file(tmp_path)},
    ) as agent:
        agent.stt.script(
            [
                "I need to move my oil change.",
                "April twelfth, nineteen eighty-five.",
                "Can I just talk to somebody please?",
            ]
        )
        client = await greeted(agent)
        for _ in range(2):
            await say_turn(client)
        await client.send_audio(speech_ulaw(0.8))
        redirect = await wait_for_redirect(agent, client.call_sid)

        # The caller hears the bot's sentence, then the hold message, then ringback while
        # the advisor line is dialed with a whisper URL and an action callback.
        assert any("connect you with a service advisor" in t for t in agent.tts.texts)
        root = ET.fromstring(redirect.form["Twiml"])
        hold, dial = list(root)
        assert hold.tag == "Say" and "Please hold" in (hold.text or "")
        assert dial.tag == "Dial" and dial.get("timeout") == "20"
        assert dial.get("action") == f"{agent.base_url}/twilio/transfer/status"
        number = dial.find("Number")
        assert number is not None and number.text == ADVISOR
        assert number.get("url") == (
            f"{agent.base_url}/twilio/transfer/whisper?call_sid={client.call_sid}"
        )
        await client.wait_closed(timeout=10)  # Twilio ended the stream; no hang-up
        row = await wait_for_row(agent, client.call_sid, summarised)
        assert agent.hang_ups(client.call_sid) == []
        assert row["transfer_reason"] == TRANSFER_REASON
        assert row["transfer_status"] == "dialing" and row["transfer_number"] == ADVISOR
        assert row["outcome"] == "transferred"
        # The LLM's summary so far replaced the CRM whisper while the line rang.
        whisper = "Maria Garcia, 2021 Camry, wants to move Tuesday's oil change; verified."
        assert row["transfer_whisper"] == whisper

        # Someone else asking for the whisper: unsigned, or signed for another call.
        whisper_path = f"/twilio/transfer/whisper?call_sid={client.call_sid}"
        child = {"CallSid": "CA" + "7" * 32, "ParentCallSid": "CA" + "8" * 32}
        assert (await agent.http.post(whisper_path, data=child)).status_code == 403
        assert (await agent.post_signed(whisper_path, child)).status_code == 403

        # The advisor answers: they alone hear the whisper, then the call is bridged.
        answers = await agent.twilio.run_dial(client.call_sid, outcome="answered")
        assert answers["whisper"].status == 200
        said = ET.fromstring(answers["whisper"].body).find("Say")
        assert said is not None and said.text == whisper
        assert answers["action"].status == 200
        assert ET.fromstring(answers["action"].body)[0].tag == "Hangup"
        [row] = agent.query(
            "SELECT transfer_status, outcome, transfer_dial_call_sid FROM calls "
            "WHERE call_sid = %s",
            (client.call_sid,),
        )
        assert row["transfer_status"] == "connected" and row["outcome"] == "transferred"
        assert row["transfer_dial_call_sid"] == answers["action"].form["DialCallSid"]
        # The whisper is served once: a replay of the advisor's request gets nothing.
        replay = await agent.twilio.send_callback(answers["whisper"].url, answers["whisper"].form)
        assert replay.status == 404 and "Garcia" not in replay.body
        assert agent.query("SELECT count(*) AS n FROM callback_requests") == [{"n": 0}]


async def test_unanswered_transfer_takes_a_callback_with_the_summary_and_says_goodbye(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    # The "summary so far" fails: the advisor would hear the CRM whisper.
    llm = FakeOpenAI(
        with_summaries([call_tool("transfer_to_advisor", {"reason": "wants a person"})])
    )
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": profile_file(tmp_path)},
    ) as agent:
        agent.stt.script(["Let me talk to a real person."])
        client = await greeted(agent)
        await client.send_audio(speech_ulaw(0.8))
        await wait_for_redirect(agent, client.call_sid)
        await client.wait_closed(timeout=10)
        row = await wait_for_row(agent, client.call_sid, summarised)
        assert row["transfer_whisper"] == "Maria Garcia, 2021 Camry, wants a person; not verified."

        answers = await agent.twilio.run_dial(client.call_sid, outcome="no-answer")
        assert "whisper" not in answers and answers["action"].status == 200
        twiml = ET.fromstring(answers["action"].body)
        assert [el.tag for el in twiml] == ["Say", "Hangup"]
        assert "no advisor could take your call" in (twiml[0].text or "")
        assert "call you back" in (twiml[0].text or "")
        # Twilio retries the action: still one callback request.
        again = await agent.twilio.send_callback(answers["action"].url, answers["action"].form)
        assert again.status == 200 and again.body == answers["action"].body
        requests = agent.query(
            "SELECT customer_id, phone, reason, summary FROM callback_requests WHERE call_sid = %s",
            (client.call_sid,),
        )
        assert requests == [
            {
                "customer_id": 1,
                "phone": MARIA,
                "reason": "advisor line no-answer on a transfer: wants a person",
                "summary": "Maria Garcia, 2021 Camry, wants a person; not verified.",
            }
        ]
        [row] = agent.query(
            "SELECT outcome, transfer_status FROM calls WHERE call_sid = %s", (client.call_sid,)
        )
        assert row == {"outcome": "callback_requested", "transfer_status": "no-answer"}
        # Odd Dial reports are refused, not guessed at.
        bad = {**answers["action"].form, "DialCallStatus": "maybe"}
        assert (await agent.post_signed("/twilio/transfer/status", bad)).status_code == 400
        unsigned = await agent.http.post("/twilio/transfer/status", data=answers["action"].form)
        assert unsigned.status_code == 403


# --- 2. call recording --------------------------------------------------------------------


def recording_requests(agent: Agent, call_sid: str) -> list[Any]:
    """REST requests about the call's recordings (start, then each update), in order."""
    return [
        r
        for r in agent.twilio.requests
        if f"/Calls/{call_sid}/Recordings" in r.path and r.method == "POST"
    ]


async def test_recording_starts_after_the_disclosure_pauses_for_verification_and_ops_can_fetch_it(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    llm = FakeOpenAI(
        with_summaries(
            [
                say("Happy to help. First, can you confirm your date of birth?"),
                call_tool("verify_customer", {"date_of_birth": "1985-04-12"}),
                say("Thanks, Maria, you're verified. Anything else?"),
                call_tool("end_call", {"reason": "done"}),
            ]
        )
    )
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": profile_file(tmp_path, recording=True)},
    ) as agent:
        agent.stt.script(
            ["I have a question about my account.", "April twelfth, 1985.", "No, that's all."]
        )
        client = await greeted(agent)
        greeting_played = client.last_bot_audio_at()
        assert "This call is recorded." in agent.tts.texts[0]
        await say_turn(client)  # the bot asks for the date of birth
        dob_spoken = await say_turn(client)  # the caller says it; the bot confirms
        await client.send_audio(speech_ulaw(0.8))
        await client.wait_closed(timeout=20)  # goodbye, then the bot hangs up
        row = await wait_for_row(
            agent, client.call_sid, lambda r: r["recording_status"] == "completed"
        )

        start, pause, resume = recording_requests(agent, client.call_sid)
        # Started through the REST API, dual channel, after the disclosure was played.
        assert start.path.endswith(f"/Calls/{client.call_sid}/Recordings.json")
        assert start.form["RecordingChannels"] == "dual"
        assert start.form["RecordingStatusCallback"] == f"{agent.base_url}/twilio/recording"
        assert start.at >= greeting_played
        [recording_sid] = agent.twilio.recordings
        # Paused while the caller gave the date of birth, resumed after the check.
        assert pause.path.endswith(f"/Recordings/{recording_sid}.json")
        assert pause.form["Status"] == "paused"
        assert pause.at < dob_spoken - 0.7  # before the caller started to speak it
        assert resume.form["Status"] == "in-progress" and resume.at > dob_spoken
        recording = agent.twilio.recordings[recording_sid]
        assert recording.statuses == ["in-progress", "paused", "in-progress", "completed"]
        # The status callbacks put SID, duration and URL on the call's row.
        assert row["recording_sid"] == recording_sid and row["recording_channels"] == 2
        assert row["recording_duration_secs"] >= 1
        assert row["recording_url"].endswith(f"/Recordings/{recording_sid}")

        # Ops fetch it through the server, which holds the Twilio credentials.
        path = f"/calls/{client.call_sid}/recording"
        assert (await agent.http.get(path)).status_code == 401
        assert (
            await agent.http.get(path, headers={"Authorization": "Bearer no"})
        ).status_code == 401
        response = await agent.http.get(path, headers=ADMIN)
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/mpeg"
        assert response.content == f"FAKE-MP3-{recording_sid}-channels=2".encode()
        assert "e2e-auth-token" not in response.text and "Authorization" not in response.text
        wav = await agent.http.get(path + "?format=wav", headers=ADMIN)
        assert wav.status_code == 200 and wav.headers["content-type"] == "audio/x-wav"
        assert (await agent.http.get(path + "?format=ogg", headers=ADMIN)).status_code == 400
        other = await agent.http.get(f"/calls/{'CA' + '0' * 32}/recording", headers=ADMIN)
        assert other.status_code == 404
        assert agent.twilio.auth_failures == 0

        # The recording callback refuses forged and odd requests.
        form = {
            "CallSid": client.call_sid,
            "RecordingSid": recording_sid,
            "RecordingStatus": "completed",
            "RecordingDuration": "1",
        }
        assert (await agent.http.post("/twilio/recording", data=form)).status_code == 403
        bad = {**form, "RecordingSid": "RE123"}
        assert (await agent.post_signed("/twilio/recording", bad)).status_code == 400
        bad = {**form, "RecordingDuration": "a lot"}
        assert (await agent.post_signed("/twilio/recording", bad)).status_code == 400
        stranger = {**form, "CallSid": "CA" + "3" * 32}
        assert (await agent.post_signed("/twilio/recording", stranger)).status_code == 404
        # A late in-progress callback does not reopen a finished recording.
        late = {**form, "RecordingStatus": "in-progress"}
        assert (await agent.post_signed("/twilio/recording", late)).status_code == 204
        [again] = agent.query(
            "SELECT recording_status FROM calls WHERE call_sid = %s", (client.call_sid,)
        )
        assert again["recording_status"] == "completed"


async def test_do_not_record_customers_are_never_recorded(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    llm = FakeOpenAI(
        with_summaries(
            [
                say("Sure. What's the phone number on your account?"),
                call_tool("lookup_customer", {"phone": "555 555 0100"}),
                call_tool("verify_customer", {"date_of_birth": "1985-04-12", "zip_code": "60614"}),
                say("Thanks, you're verified."),
            ]
        )
    )
    with psycopg.connect(crm_db, autocommit=True) as conn:
        conn.execute("UPDATE customers SET do_not_record = true WHERE id = 1")
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": profile_file(tmp_path, recording=True)},
    ) as agent:
        # Caller ID matches a do-not-record customer: no disclosure, no recording.
        client = await greeted(agent)
        assert "recorded" not in agent.tts.texts[0]
        await client.hang_up()
        await wait_for_row(agent, client.call_sid, summarised)
        assert recording_requests(agent, client.call_sid) == []

        # From another number the call is recorded, until the caller proves to be her.
        agent.stt.script(["I'd like to check my appointment.", "It's 555 555 0100."])
        spoken_before = len(agent.tts.texts)
        client = await greeted(agent, caller="+15555559876")
        assert "This call is recorded." in agent.tts.texts[spoken_before]
        await say_turn(client)
        await say_turn(client)
        await client.hang_up()
        row = await wait_for_row(agent, client.call_sid, summarised)
        statuses = [r.form.get("Status") for r in recording_requests(agent, client.call_sid)]
        assert statuses == [None, "stopped"]  # started, then stopped once she was verified
        assert row["recording_status"] in ("stopped", "completed")


# --- 4. voicemail after the beep ----------------------------------------------------------


async def placed_call(agent: Agent, *, customer_id: int, to: str, attempt: bool = False):
    """An outbound service-due call the server places (and its campaign attempt)."""
    from telephony.twilio import place_outbound_call

    attempt_id = None
    if attempt:
        [row] = agent.query(
            "INSERT INTO campaign_attempts (campaign, customer_id, local_date, reason, status, "
            "attempt_count, dialed_at) VALUES ('service_due', %s, current_date, 'due by date', "
            "'dialing', 1, now()) RETURNING id",
            (customer_id,),
        )
        attempt_id = row["id"]
    call_sid = await place_outbound_call(
        agent.settings,
        to=to,
        scenario="service_due",
        customer_id=customer_id,
        campaign_attempt_id=attempt_id,
    )
    if attempt_id is not None:
        agent.query(
            "UPDATE campaign_attempts SET call_sid = %s WHERE id = %s RETURNING id",
            (call_sid, attempt_id),
        )
    return call_sid, attempt_id


async def test_voicemail_is_left_after_the_beep_and_the_attempt_recorded(
    crm_db: str, redis_server_url: str
) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        call_sid, attempt_id = await placed_call(agent, customer_id=1, to=MARIA, attempt=True)
        [create] = agent.twilio.requests_to("POST", "/Calls.json")
        query = f"scenario=service_due&customer_id=1&attempt_id={attempt_id}"
        assert create.form["MachineDetection"] == "DetectMessageEnd"
        assert create.form["AsyncAmd"] == "true"
        assert create.form["AsyncAmdStatusCallback"] == f"{agent.base_url}/twilio/amd?{query}"
        assert create.form["AsyncAmdStatusCallbackMethod"] == "POST"
        assert create.form["Url"] == f"{agent.base_url}/twilio/outbound?{query}"

        # Asynchronous AMD: the call is answered and the bot starts at once; the machine's
        # greeting plays over it. Twilio's verdict comes once the greeting ended, at the beep.
        client = await agent.answer_placed_call(call_sid)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        assert agent.twilio.callbacks == []
        verdict = await agent.twilio.send_amd_verdict(call_sid, "machine_end_beep")
        assert verdict.status == 204
        redirect = await wait_for_redirect(agent, call_sid)
        twiml = ET.fromstring(redirect.form["Twiml"])
        assert [el.tag for el in twiml] == ["Say", "Hangup"]
        message = twiml[0].text or ""
        assert message.startswith("Hi, this is the AI assistant from Riverside Motors service")
        assert "call us back at 5 5 5, 5 5 5, 0 1 9 9." in message  # digit by digit
        await client.wait_closed(timeout=10)  # Twilio ended the stream for the message
        row = await wait_for_row(agent, call_sid, summarised)
        assert row["outcome"] == "voicemail" and row["answered_by"] == "machine_end_beep"
        # The message plays to its end: nothing hangs the call up over it.
        assert agent.hang_ups(call_sid) == []
        # Twilio retries the verdict: no second message.
        again = await agent.twilio.send_amd_verdict(call_sid, "machine_end_beep")
        assert again.status == 204
        assert [r for r in agent.call_updates(call_sid) if "Twiml" in r.form] == [redirect]
        # The call completes: the attempt is a voicemail.
        done = {"CallSid": call_sid, "CallStatus": "completed", "SequenceNumber": "4"}
        assert (await agent.post_signed("/twilio/status", done)).status_code == 204
        [attempt] = agent.query(
            "SELECT status, outcome FROM campaign_attempts WHERE id = %s", (attempt_id,)
        )
        assert attempt == {"status": "completed", "outcome": "voicemail"}
        # Forged and odd verdicts are refused.
        path = f"/twilio/amd?{query}"
        form = {"CallSid": call_sid, "AnsweredBy": "machine_end_beep"}
        assert (await agent.http.post(path, data=form)).status_code == 403
        odd = {"CallSid": call_sid, "AnsweredBy": "robot"}
        assert (await agent.post_signed(path, odd)).status_code == 400
        odd = {**form, "MachineDetectionDuration": "soon"}
        assert (await agent.post_signed(path, odd)).status_code == 400
        odd_query = path.replace("service_due", "inbound")
        assert (await agent.post_signed(odd_query, form)).status_code == 400


@pytest.mark.parametrize("answered_by", ["machine_end_silence", "human", "unknown"])
async def test_amd_verdicts(crm_db: str, redis_server_url: str, answered_by: str) -> None:
    llm = FakeOpenAI(with_summaries([say("Great, am I speaking with Maria?")]))
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script(["Yes, this is Maria."])
        call_sid, _ = await placed_call(agent, customer_id=1, to=MARIA)
        client = await agent.answer_placed_call(call_sid)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        verdict = await agent.twilio.send_amd_verdict(call_sid, answered_by)
        assert verdict.status == 204
        if answered_by == "machine_end_silence":
            redirect = await wait_for_redirect(agent, call_sid)
            assert "5 5 5, 5 5 5, 0 1 9 9" in redirect.form["Twiml"]
            await client.wait_closed(timeout=10)
            row = await wait_for_row(agent, call_sid, summarised)
            assert row["outcome"] == "voicemail"
        else:  # a person (or Twilio could not tell): the conversation goes on
            await say_turn(client)
            assert agent.tts.texts[-1].strip() == "Great, am I speaking with Maria?"
            await client.hang_up()
            row = await wait_for_row(agent, call_sid, summarised)
            assert row["outcome"] != "voicemail"
            assert [r for r in agent.call_updates(call_sid) if "Twiml" in r.form] == []
        assert row["answered_by"] == answered_by


# --- 3. keypad ----------------------------------------------------------------------------


async def test_keyed_zip_code_verifies_without_the_model_and_zero_reaches_an_advisor(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    from loguru import logger

    llm = FakeOpenAI(
        with_summaries(
            [
                say("Sure. What's your ZIP code? You can also key it in and press pound."),
                say("Sorry, that wasn't a ZIP code. Could you key it again?"),
                say("Thanks, Maria, you're verified. What can I do for you?"),
            ]
        )
    )
    log_lines: list[str] = []
    sink = logger.add(log_lines.append, level="DEBUG", diagnose=False)
    try:
        async with running_agent(
            database_url=crm_db,
            redis_url=redis_server_url,
            llm=llm,
            env={"DEALERSHIP_PROFILE": profile_file(tmp_path, recording=True)},
        ) as agent:
            agent.stt.script(["I need to check on my appointment."])
            client = await greeted(agent)
            await say_turn(client)  # the bot asks for the ZIP code: keys are an entry now
            for key in "123#":  # not a factor: the model is told so, without the digits
                await client.send_dtmf(key)
            await client.wait_for_bot_audio(min_seconds=0.2, timeout=20)
            await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
            for key in "60614#":
                await client.send_dtmf(key)
            await client.wait_for_bot_audio(min_seconds=0.2, timeout=20)
            await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
            assert any(t.startswith("Thanks, Maria, you're verified.") for t in agent.tts.texts)
            await client.send_dtmf("0")  # an advisor, at any time
            redirect = await wait_for_redirect(agent, client.call_sid)
            await client.wait_closed(timeout=10)
            row = await wait_for_row(agent, client.call_sid, summarised)
            await agent.twilio.settle()
    finally:
        logger.remove(sink)

    assert ADVISOR in redirect.form["Twiml"]
    assert row["verified"] is True and row["customer_id"] == 1
    assert row["transfer_reason"] == "caller pressed 0 for an advisor"
    # The model learned the results, never the digits.
    notes = [
        m["content"]
        for m in llm.requests[-1]["messages"] + llm.requests[2]["messages"]
        if m["role"] in ("developer", "system") and "keypad" in str(m["content"])
    ]
    assert any("keyed in their ZIP code" in n and '"verified": true' in n for n in notes)
    assert any("not a date of birth" in n for n in notes)
    everything = json.dumps(llm.requests) + json.dumps(row["transcript"], default=str)
    everything += "".join(log_lines)
    assert "60614" not in everything and "123" not in json.dumps(row["transcript"])
    # The keyed factor was not recorded: paused at the question, resumed after the check.
    statuses = [r.form.get("Status") for r in recording_requests(agent, client.call_sid)]
    assert statuses[:3] == [None, "paused", "in-progress"]


# --- 6. post-call summary -----------------------------------------------------------------

FINAL = {
    "reason": "Oil change for the 2021 Camry.",
    "outcome": "Booked an oil change.",
    "appointments": ["oil change, 2021 Toyota Camry, first open slot"],
    "follow_ups": [],
    "sentiment": "positive",
    "text": "Maria called to book an oil change for her Camry and took the first slot.",
}


async def test_llm_summary_after_the_call_is_stored_and_shown_to_ops(
    crm_db: str, redis_server_url: str
) -> None:
    from tests.harness import BOOKING_UTTERANCES, booking_script

    llm = FakeOpenAI(with_summaries(booking_script(), final=FINAL))
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script(BOOKING_UTTERANCES)
        client = await greeted(agent)
        for _ in range(3):
            await say_turn(client)
        await say_turn(client, expect_reply=False)
        await client.wait_closed(timeout=30)
        row = await wait_for_row(agent, client.call_sid, summarised)

        # One short JSON completion, after the conversation's (streamed) requests.
        streamed = [bool(body.get("stream")) for body in llm.requests]
        assert streamed[-1] is False and all(streamed[:-1]) and len(streamed) >= 8
        request = llm.requests[-1]
        assert request["response_format"] == {"type": "json_object"}
        facts = json.loads(request["messages"][1]["content"])
        assert facts["outcome"] == "booked" and facts["customer_verified"] is True
        [booked] = facts["appointments_made_or_changed"]
        assert "oil change for the 2021 Toyota Camry" in booked
        assert row["summary_source"] == "llm"
        assert row["summary"] == FINAL["text"] and row["summary_data"] == FINAL

        path = f"/calls/{client.call_sid}/summary"
        assert (await agent.http.get(path)).status_code == 401
        shown = (await agent.http.get(path, headers=ADMIN)).json()
        assert shown["summary_data"] == FINAL and shown["outcome"] == "booked"
        assert shown["verified"] is True and "transcript" not in shown
        unknown = await agent.http.get(f"/calls/{'CA' + 'f' * 32}/summary", headers=ADMIN)
        assert unknown.status_code == 404
        bad = await agent.http.get("/calls/not-a-call/summary", headers=ADMIN)
        assert bad.status_code == 404


async def test_summary_falls_back_to_the_template_when_the_llm_fails(
    crm_db: str, redis_server_url: str
) -> None:
    llm = FakeOpenAI(with_summaries([say("Sure, I can help with that.")]))
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script(["I have a question about my car."])
        client = await greeted(agent)
        await say_turn(client)
        await client.hang_up()
        row = await wait_for_row(agent, client.call_sid, summarised)
        assert row["summary_source"] == "template"
        data = row["summary_data"]
        assert data["reason"] == "Inbound call to the service department."
        assert data["outcome"] == "The caller got information; nothing was changed."
        assert data["sentiment"] == "unknown" and data["appointments"] == []
        assert row["summary"].startswith("Inbound inbound call with Maria (not verified).")

    # JSON of the wrong shape counts as a failure too.
    llm = FakeOpenAI(with_summaries([say("Sure.")], final={"reason": "", "sentiment": "great"}))
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script(["Hello?"])
        client = await greeted(agent)
        await say_turn(client)
        await client.hang_up()
        row = await wait_for_row(agent, client.call_sid, summarised)
        assert row["summary_source"] == "template" and row["summary_data"]["reason"]


async def test_after_hours_callback_request_carries_the_summary(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    final = {**FINAL, "reason": "Wants a person.", "text": "Maria asked for an advisor."}
    llm = FakeOpenAI(
        with_summaries(
            [
                call_tool("transfer_to_advisor", {"reason": "wants to talk about a repair"}),
                say("Our advisors are away, so one will call you back when we open."),
            ],
            final=final,
        )
    )
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": profile_file(tmp_path, open_now=False)},
    ) as agent:
        agent.stt.script(["Can I talk to someone about a repair?"])
        client = await greeted(agent)
        await say_turn(client)
        await client.hang_up()
        row = await wait_for_row(agent, client.call_sid, summarised)
        assert row["outcome"] == "callback_requested"
        assert [r.form for r in agent.call_updates(client.call_sid) if "Twiml" in r.form] == []
        requests = agent.query(
            "SELECT reason, summary FROM callback_requests WHERE call_sid = %s", (client.call_sid,)
        )
        assert requests == [
            {"reason": "wants to talk about a repair", "summary": "Maria asked for an advisor."}
        ]


# --- 5. Spanish ---------------------------------------------------------------------------

SPANISH_VOICE = "aura-2-celeste-es"


def system_prompt(body: dict[str, Any]) -> str:
    return str(body["messages"][0]["content"])


async def test_a_caller_who_speaks_spanish_is_served_in_spanish(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    from tests.harness import last_tool_result

    seen: dict[str, Any] = {}

    def first_reply(body: dict[str, Any]):
        seen["first"] = body
        return call_tool("check_availability", {"service_type": "oil_change"})

    def offer(body: dict[str, Any]):
        slots = last_tool_result(body, "check_availability")["slots"]
        seen["slots"] = slots
        return say(f"Tengo el {slots[0]['when']} o el {slots[1]['when']}. ¿Cuál prefiere?")

    llm = FakeOpenAI(
        with_summaries(
            [
                first_reply,
                offer,
                call_tool("transfer_to_advisor", {"reason": "quiere hablar con una persona"}),
            ]
        )
    )
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": profile_file(tmp_path)},
    ) as agent:
        agent.stt.script(
            [
                ("Hola, necesito un cambio de aceite para mi Camry.", "es"),
                ("Prefiero hablar con una persona, por favor.", "es"),
            ]
        )
        client = await greeted(agent)
        assert agent.stt.last_query["language"] == "multi"  # nova-3 multilingual
        assert agent.tts.queries[0]["model"] == "aura-2-asteria-en"
        await say_turn(client)
        # The reply to the first Spanish words is already Spanish: prompt, voice, read-back.
        assert "Habla siempre en español" in system_prompt(seen["first"])
        assert agent.tts.queries[-1]["model"] == SPANISH_VOICE
        weekdays = ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo")
        assert all(slot["when"].startswith(weekdays) for slot in seen["slots"])
        assert " de la " in seen["slots"][0]["when"]
        assert any(t.startswith("Tengo el ") for t in agent.tts.texts)
        await client.send_audio(speech_ulaw(0.8))
        redirect = await wait_for_redirect(agent, client.call_sid)
        # The fixed transfer sentence and the hold message are Spanish too.
        assert any("Le comunico ahora con un asesor de servicio" in t for t in agent.tts.texts), (
            agent.tts.texts
        )
        hold = ET.fromstring(redirect.form["Twiml"]).find("Say")
        assert hold is not None and hold.get("language") == "es-MX"
        assert (hold.text or "").startswith("Por favor, espere")
        await client.wait_closed(timeout=10)
        row = await wait_for_row(agent, client.call_sid, summarised)
        assert row["language"] == "es"
        assert row["transfer_whisper"].endswith("The caller speaks Spanish.")
        answers = await agent.twilio.run_dial(client.call_sid, outcome="busy")
        sorry = ET.fromstring(answers["action"].body).find("Say")
        assert sorry is not None and sorry.get("language") == "es-MX"
        assert (sorry.text or "").startswith("Lo siento, ningún asesor")


async def test_key_nine_switches_to_spanish(crm_db: str, redis_server_url: str) -> None:
    seen: list[dict[str, Any]] = []

    def goodbye(body: dict[str, Any]):
        seen.append(body)
        return call_tool("end_call", {"reason": "listo"})

    llm = FakeOpenAI(with_summaries([goodbye]))
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script(["No, eso es todo, gracias."])
        client = await greeted(agent)
        assert agent.tts.texts[0].strip().endswith("Para español, oprima nueve.")
        await client.send_dtmf("9")
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        assert agent.tts.texts[-1].strip() == (
            "Con gusto le atiendo en español. ¿En qué le puedo ayudar?"
        )
        assert agent.tts.queries[-1]["model"] == SPANISH_VOICE
        await client.send_audio(speech_ulaw(0.8))
        await client.wait_closed(timeout=20)
        assert "Habla siempre en español" in system_prompt(seen[0])
        assert agent.tts.texts[-1].strip() == "Gracias por llamar a Riverside Motors. ¡Adiós!"
        row = await wait_for_row(agent, client.call_sid, summarised)
        assert row["language"] == "es"


async def test_crm_preferred_language_makes_outbound_calls_spanish(
    crm_db: str, redis_server_url: str
) -> None:
    with psycopg.connect(crm_db, autocommit=True) as conn:
        conn.execute("UPDATE customers SET preferred_language = 'es' WHERE id = 2")
    seen: list[dict[str, Any]] = []

    def reply(body: dict[str, Any]):
        seen.append(body)
        return say("Gracias, James. Para verificar, ¿me da su fecha de nacimiento?")

    llm = FakeOpenAI(with_summaries([reply]))
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script([("Sí, soy James.", "es")])
        client = await agent.answered_outbound_call(
            to="+15555550101", scenario="confirmation", customer_id=2, answered_by=None
        )
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        assert agent.tts.texts[0].strip() == (
            "Hola, le habla el asistente de inteligencia artificial del servicio de "
            "Riverside Motors. ¿Hablo con James?"
        )
        # The voice is opened before the CRM answers (a call never waits on the database
        # to start); it is Spanish before the first word.
        assert agent.tts.queries[-1]["model"] == SPANISH_VOICE
        await say_turn(client)
        assert "Habla siempre en español" in system_prompt(seen[0])
        assert "confirmar su próxima cita" in system_prompt(seen[0])
        await client.hang_up()
        row = await wait_for_row(agent, client.call_sid, summarised)
        assert row["language"] == "es"

        # His voicemail is Spanish too, with the number digit by digit.
        call_sid, _ = await placed_call(agent, customer_id=2, to="+15555550101")
        machine = await agent.answer_placed_call(call_sid)
        await machine.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await agent.twilio.send_amd_verdict(call_sid, "machine_end_other")
        redirect = await wait_for_redirect(agent, call_sid)
        message = ET.fromstring(redirect.form["Twiml"]).find("Say")
        assert message is not None and message.get("language") == "es-MX"
        assert (message.text or "").startswith("Hola, le habla el asistente")
        assert "al 5 5 5, 5 5 5, 0 1 9 9." in (message.text or "")


# --- profile switches off -----------------------------------------------------------------


async def test_switches_off_cold_transfer_no_pause_english_only(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    llm = FakeOpenAI(
        with_summaries(
            [
                say("Sure. What's your date of birth?"),
                call_tool("verify_customer", {"date_of_birth": "1985-04-12"}),
                call_tool("transfer_to_advisor", {"reason": "wants a person"}),
            ]
        )
    )
    profile = profile_file(
        tmp_path,
        recording=True,
        phone={
            "languages": ["en"],
            "warm_transfer": False,
            "pause_recording_during_verification": False,
        },
    )
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": profile},
    ) as agent:
        agent.stt.script(["I have a question.", "April twelfth, 1985."])
        client = await greeted(agent)
        assert agent.stt.last_query["language"] == "en"
        assert "oprima" not in agent.tts.texts[0]
        await say_turn(client)
        await client.send_audio(speech_ulaw(0.8))
        redirect = await wait_for_redirect(agent, client.call_sid)
        assert ET.fromstring(redirect.form["Twiml"]).find("Dial").text == ADVISOR  # type: ignore[union-attr]
        assert "Number" not in redirect.form["Twiml"] and "Say" not in redirect.form["Twiml"]
        await client.wait_closed(timeout=10)
        row = await wait_for_row(agent, client.call_sid, summarised)
        assert row["transfer_status"] is None and row["outcome"] == "transferred"
        # Recorded throughout: no pause for the date of birth.
        statuses = [r.form.get("Status") for r in recording_requests(agent, client.call_sid)]
        assert statuses == [None]

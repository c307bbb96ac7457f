"""The phone features of one call, behind a few hooks in :func:`bot.pipeline.run_call`.

* Recording: after the greeting (with its disclosure) has been played, a dual-channel
  Twilio recording starts when the profile records and the customer is not on the
  do-not-record list. It pauses when the bot asks for a verification factor and resumes
  when ``verify_customer`` returns (``[phone] pause_recording_during_verification``); it
  stops when the verified customer turns out to be on the do-not-record list.
* Keypad: ``0`` hands the caller to an advisor at any time; ``9`` switches to Spanish; a
  date of birth, ZIP code or VIN last four keyed in after the bot asked for one goes
  straight to the verification tool (never to the model, the transcript or the logs).
* Language: the CRM's ``preferred_language`` on an outbound call, the caller's first
  words (Deepgram multilingual) or key 9 switch the call to Spanish: voice, system prompt,
  fixed sentences and date read-backs.
* Summary: after the call, a structured summary (LLM, template on failure) on the call's
  row and on its callback request.

The hooks: :meth:`CallFeatures.open` (after caller identification),
:meth:`after_stt` / :meth:`before_tts` (processors), :meth:`bind` (once the worker and the
flow exist), :meth:`on_greeting_played` and :meth:`close` (after the call's row is
written).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    Frame,
    LLMMessagesAppendFrame,
    LLMUpdateSettingsFrame,
    TTSSpeakFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.deepgram.tts import DeepgramTTSService
from pipecat.services.openai.llm import OpenAILLMService

from bot.handover import AdvisorHandover
from bot.i18n import text, translator
from bot.prompts import render_system_prompt
from bot.summary import call_facts, summarize
from core.resources import AppResources
from core.settings import Settings
from crm import phone as crm_phone
from processors.fixed_speech import FixedSpeechTranslator
from processors.keypad import KeypadProcessor
from processors.language_detect import LanguageDetector
from processors.verification_watch import VerificationWatcher
from telephony import rest as twilio_rest
from telephony import twilio as tw
from tools.context import CallSession
from tools.registry import ToolContext, run_tool

ADVISOR_KEY = "0"
SPANISH_KEY = "9"
#: Seconds :meth:`CallFeatures.close` waits for work still running (REST, keypad checks).
CLOSE_WAIT_SECS = 10.0


def tts_voice(settings: Settings, language: str) -> str:
    """The Aura-2 voice of a language (``DEEPGRAM_TTS_VOICE`` / ``DEEPGRAM_TTS_VOICE_ES``)."""
    return settings.deepgram_tts_voice_es if language == "es" else settings.deepgram_tts_voice


def stt_language(languages: tuple[str, ...]) -> str:
    """Deepgram's ``language``: ``multi`` (code-switching) when several are offered."""
    default, *others = languages
    return "multi" if others else default


def keyed_factor(digits: str) -> tuple[str, dict[str, str]] | None:
    """The verification factor a keypad entry is, by its length.

    8 digits: a date of birth (``MMDDYYYY``, or ``YYYYMMDD``); 5 or 9: a ZIP code; 4: the
    last four of a VIN.

    Returns:
        ``(label, verify_customer arguments)``, or ``None`` for anything else.
    """
    if not digits.isdigit():
        return None
    if len(digits) == 8:
        for fmt in ("%m%d%Y", "%Y%m%d"):
            try:
                born = datetime.strptime(digits, fmt).date()
            except ValueError:
                continue
            if date(1900, 1, 1) < born <= date.today():
                return "date of birth", {"date_of_birth": born.isoformat()}
        return None
    if len(digits) in (5, 9):
        return "ZIP code", {"zip_code": digits[:5]}
    if len(digits) == 4:
        return "VIN's last four", {"vin_last4": digits}
    return None


class CallFeatures:
    """Recording, keypad, language and summary of one call.

    Args:
        resources: Process resources.
        session: The call's session.
        ctx: The call's tool context.
        call_control: The call's telephony control (an :class:`AdvisorHandover` on a Twilio
            call; ``None`` in the browser and in tests without telephony).
        now: Clock.
    """

    def __init__(
        self,
        *,
        resources: AppResources,
        session: CallSession,
        ctx: ToolContext,
        call_control: Any,
        now: Callable[[], datetime],
    ) -> None:
        self.resources = resources
        self.session = session
        self.ctx = ctx
        self.now = now
        self.handover = call_control if isinstance(call_control, AdvisorHandover) else None
        self.twilio: tw.TwilioCallControl | None = self.handover.twilio if self.handover else None
        profile = resources.profile
        self.languages = profile.phone.languages
        self.recording_sid: str | None = None
        self.recording_state: str | None = None
        self.keypad_armed = False
        self.worker: Any = None
        self.manager: Any = None
        self.flow: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._recording_lock = asyncio.Lock()
        self.keypad = KeypadProcessor(on_entry=self._on_keypad, armed=lambda: self.keypad_armed)
        self.detector = LanguageDetector(
            on_language=self._on_detected_language,
            current=lambda: self.session.language,
            offered=self.languages,
        )
        self.watcher = VerificationWatcher(
            on_factor_prompt=self._on_factor_prompt,
            on_verify_result=self.on_verify_result,
            active=lambda: not self.session.verified,
        )
        self.speech = FixedSpeechTranslator(
            translate=translator(profile, lambda: self.session.language)
        )

    # --- hooks ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        resources: AppResources,
        session: CallSession,
        ctx: ToolContext,
        call_control: Any,
        now: Callable[[], datetime],
    ) -> CallFeatures:
        """The features of a call, before anything is known about the caller."""
        features = cls(
            resources=resources, session=session, ctx=ctx, call_control=call_control, now=now
        )
        if session.language not in features.languages:
            session.language = features.languages[0]
        return features

    @classmethod
    async def open(
        cls,
        *,
        resources: AppResources,
        session: CallSession,
        ctx: ToolContext,
        call_control: Any,
        now: Callable[[], datetime],
    ) -> CallFeatures:
        """The features of a call whose caller was identified (before the pipeline).

        Reads the matched customer's do-not-record flag, and on an outbound call their
        preferred language, into the session; records the call's language.
        """
        features = cls.create(
            resources=resources, session=session, ctx=ctx, call_control=call_control, now=now
        )
        await features.apply_customer()
        return features

    async def apply_customer(self) -> list[Frame]:
        """Once the caller is identified: the customer's do-not-record flag and, on an
        outbound call, their preferred language.

        Returns:
            Frames that switch a running call to the customer's language (voice and
            prompt); empty when nothing changes.
        """
        session, frames = self.session, []
        if session.customer_id is not None:
            try:
                async with self.resources.db.connection() as conn:
                    person = await crm_phone.customer_phone_profile(conn, session.customer_id)
            except Exception as exc:  # the call goes on with the defaults
                logger.warning(f"call {session.call_sid}: customer prefs: {type(exc).__name__}")
                person = None
            if person is not None:
                session.do_not_record = person.do_not_record
                preferred = person.preferred_language.split("-")[0].lower()
                if session.direction == "outbound" and preferred in self.languages:
                    self.detector.decide(preferred)
                    if preferred != session.language:
                        return self._language_frames(preferred)  # stores the language too
        if session.language != "en":
            await self._store_language()
        return frames

    def after_stt(self) -> list[FrameProcessor]:
        """Processors between the STT and the user aggregator."""
        processors: list[FrameProcessor] = [self.keypad]
        if len(self.languages) > 1:
            processors.append(self.detector)
        return processors

    def before_tts(self) -> list[FrameProcessor]:
        """Processors between the LLM and the TTS."""
        return [self.watcher, self.speech]

    def bind(self, *, worker: Any, manager: Any, flow: Any) -> None:
        """The call's worker, flow manager and flow (for keypad actions)."""
        self.worker = worker
        self.manager = manager
        self.flow = flow

    async def on_greeting_played(self) -> None:
        """The greeting, with its recording disclosure, has been played: record."""
        if not self._should_record():
            return
        await self._start_recording()

    async def close(self, *, incidents: list[str] | None = None) -> None:
        """After the call: finish pending work, then write the summary.

        Args:
            incidents: What went wrong on the call (service failures), added to the summary.
        """
        if self.handover is not None:
            await self.handover.wait()
        await self._wait_tasks()
        session = self.session
        try:
            facts = await call_facts(self.resources, session)
            summary, source = await summarize(self.resources, facts, call_sid=session.call_sid)
            text, data = summary.text, summary.model_dump()
            if incidents:
                text += " Incidents: " + ", ".join(incidents) + "."
                data["incidents"] = list(incidents)
            async with self.resources.db.connection() as conn:
                await crm_phone.save_summary(
                    conn, call_sid=session.call_sid, text=text, data=data, source=source
                )
                await crm_phone.attach_callback_summary(
                    conn, call_sid=session.call_sid, summary=summary.text
                )
        except Exception as exc:
            logger.error(f"call {session.call_sid}: summary not stored: {type(exc).__name__}")

    # --- recording --------------------------------------------------------------------

    def _should_record(self) -> bool:
        return bool(
            self.resources.profile.recording_enabled
            and self.twilio is not None
            and not self.session.do_not_record
        )

    async def _start_recording(self) -> None:
        assert self.twilio is not None
        call_sid = self.session.call_sid
        async with self._recording_lock:
            try:
                started = await twilio_rest.start_recording(
                    self.twilio.settings,
                    call_sid,
                    status_callback=tw.public_url(self.twilio.settings, "/twilio/recording"),
                )
            except Exception as exc:
                logger.error(f"call {call_sid}: recording not started: {type(exc).__name__}")
                return
            self.recording_sid = started.sid
            self.recording_state = "in-progress"
            try:
                async with self.resources.db.connection() as conn:
                    await crm_phone.recording_started(
                        conn, call_sid=call_sid, recording_sid=started.sid, channels=2
                    )
            except Exception as exc:
                logger.error(f"call {call_sid}: recording not stored: {type(exc).__name__}")
        logger.info(f"call {call_sid}: recording {started.sid} started")

    async def _set_recording(self, status: str) -> None:
        """Pause (``paused``), resume (``in-progress``) or stop (``stopped``), in order."""
        call_sid = self.session.call_sid
        async with self._recording_lock:
            sid = self.recording_sid
            if sid is None or self.twilio is None or self.recording_state in (None, "stopped"):
                return
            if self.recording_state == status:
                return
            try:
                await twilio_rest.update_recording(
                    self.twilio.settings, call_sid, sid, status=status
                )
            except Exception as exc:
                logger.error(f"call {call_sid}: recording not {status}: {type(exc).__name__}")
                return
            self.recording_state = status
            try:
                async with self.resources.db.connection() as conn:
                    await crm_phone.set_recording_status(
                        conn, call_sid=call_sid, recording_sid=sid, status=status
                    )
            except Exception as exc:
                logger.warning(f"call {call_sid}: recording state: {type(exc).__name__}")
        logger.info(f"call {call_sid}: recording {status}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.session.call_sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait_tasks(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_WAIT_SECS)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- verification -----------------------------------------------------------------

    async def _on_factor_prompt(self) -> None:
        """The bot asked for a date of birth, ZIP code or VIN: keys are an entry now, and
        the recording pauses (in order, without holding the pipeline)."""
        self.keypad_armed = True
        if self.resources.profile.phone.pause_recording_during_verification:
            self._spawn(self._set_recording("paused"), "recording-pause")

    async def on_verify_result(self, result: Any) -> None:
        """``verify_customer`` returned (spoken or keyed): resume, or stop for a customer
        on the do-not-record list."""
        verified = isinstance(result, dict) and bool(result.get("verified"))
        if verified:
            self.keypad_armed = False
        self._spawn(self._after_verification(verified), "recording-resume")

    async def _after_verification(self, verified: bool) -> None:
        if verified and self.session.customer_id is not None and self.recording_sid:
            try:
                async with self.resources.db.connection() as conn:
                    person = await crm_phone.customer_phone_profile(conn, self.session.customer_id)
            except Exception as exc:
                logger.warning(f"call {self.session.call_sid}: prefs: {type(exc).__name__}")
                person = None
            if person is not None and person.do_not_record:
                self.session.do_not_record = True
                await self._set_recording("stopped")
                return
        await self._set_recording("in-progress")

    # --- keypad -----------------------------------------------------------------------

    async def _on_keypad(self, entry: str) -> list[Frame] | None:
        """A key (or an entry) from the caller's keypad. Never logs the digits."""
        if entry == ADVISOR_KEY:
            self._spawn(self._keypad_advisor(), "keypad-advisor")
            return None
        if not self.keypad_armed:
            if entry == SPANISH_KEY and "es" in self.languages and self.session.language != "es":
                self.detector.decide("es")
                recorded = text("recorded", "es") if self._should_record() else ""
                ack = text("switched", "es", recorded=recorded)
                return [*self._language_frames("es"), TTSSpeakFrame(ack)]
            return None
        factor = keyed_factor(entry)
        if factor is None:
            logger.info(f"call {self.session.call_sid}: keypad entry not understood")
            self._spawn(self._tell_model(None, None), "keypad-note")
            return None
        self._spawn(self._keypad_verify(*factor), "keypad-verify")
        return None

    async def _keypad_advisor(self) -> None:
        session = self.session
        if session.pending_action == "transfer" or self.flow is None or self.manager is None:
            return
        logger.info(f"call {session.call_sid}: caller pressed 0 for an advisor")
        result = await run_tool(
            self.ctx, "transfer_to_advisor", {"reason": "caller pressed 0 for an advisor"}
        )
        node = self.flow.next_node("transfer_to_advisor", result)
        if node is not None:
            await self.manager.set_node_from_config(node)
        else:
            await self._tell_model("transfer_to_advisor", result, what="pressed 0")

    async def _keypad_verify(self, label: str, arguments: dict[str, str]) -> None:
        session = self.session
        logger.info(f"call {session.call_sid}: verification factor keyed in")
        result = await run_tool(self.ctx, "verify_customer", arguments)
        await self.on_verify_result(result)
        node = self.flow.next_node("verify_customer", result) if self.flow else None
        await self._tell_model(
            "verify_customer", result, what=f"keyed in their {label}", run_llm=node is None
        )
        if node is not None and self.manager is not None:
            await self.manager.set_node_from_config(node)

    async def _tell_model(
        self,
        tool: str | None,
        result: dict[str, Any] | None,
        *,
        what: str = "keyed something",
        run_llm: bool = True,
    ) -> None:
        """Tell the model what the keypad did (the result, never the digits)."""
        if self.worker is None:
            return
        if tool is None:
            note = (
                "The caller keyed in something on the phone keypad that is not a date of "
                "birth (8 digits), a ZIP code (5) or a VIN's last four (4). Ask again."
            )
        else:
            note = (
                f"The caller {what} on the phone keypad (the digits are not shown to you). "
                f"{tool} returned: {json.dumps(result, default=str)}. Continue from this."
            )
        await self.worker.queue_frame(
            LLMMessagesAppendFrame(
                messages=[{"role": "developer", "content": note}], run_llm=run_llm
            )
        )

    # --- language ---------------------------------------------------------------------

    async def _on_detected_language(self, language: str) -> list[Frame]:
        logger.info(f"call {self.session.call_sid}: caller speaks {language}; switching")
        return self._language_frames(language)

    def _language_frames(self, language: str) -> list[Frame]:
        """Switch the session and return the voice and prompt settings of ``language``."""
        session = self.session
        session.language = language
        self._spawn(self._store_language(), "call-language")
        prompt = render_system_prompt(
            session.scenario, profile=self.resources.profile, session=session, now=self.now()
        )
        return [
            TTSUpdateSettingsFrame(
                delta=DeepgramTTSService.Settings(
                    voice=tts_voice(self.resources.settings, language)
                )
            ),
            LLMUpdateSettingsFrame(delta=OpenAILLMService.Settings(system_instruction=prompt)),
        ]

    async def _store_language(self) -> None:
        try:
            async with self.resources.db.connection() as conn:
                await crm_phone.set_call_language(
                    conn, call_sid=self.session.call_sid, language=self.session.language
                )
        except Exception as exc:
            logger.warning(f"call {self.session.call_sid}: language: {type(exc).__name__}")

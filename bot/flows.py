"""Conversation flow (Pipecat Flows) for the inbound and outbound scenarios.

Inbound: greeting with AI disclosure → identify and verify → what they need (vehicle,
schedule / reschedule / cancel / history question) → confirm (read back day, time,
vehicle, transportation, confirmation code) → anything else → goodbye. Outbound
scenarios verify first, then work on their task with the same tools. Transfer to an
advisor and ending the call are global functions, reachable from every node.

Every flow function goes through :func:`tools.registry.run_tool`, so the bot, the tool
console and the tests share one code path. Tools keep Pipecat's default
``cancel_on_interruption=True``; writes are shielded inside ``run_tool`` and the user is
muted while a function runs, so a booking either completes or does not happen and the
bot learns which.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger
from pipecat.flows import (
    ActionConfig,
    FlowArgs,
    FlowManager,
    FlowsDirectFunction,
    FlowsFunctionSchema,
    NodeConfig,
)
from pipecat.frames.frames import LLMMessagesAppendFrame

from bot.i18n import localize_result
from tools.context import ToolContext
from tools.registry import TOOLS, run_tool

IDENTIFY_TOOLS = ("lookup_customer", "verify_customer")
SERVICE_TOOLS = (
    "get_vehicle_history",
    "list_appointments",
    "check_availability",
    "book_appointment",
    "reschedule_appointment",
    "cancel_appointment",
)
OUTBOUND_TOOLS = (*SERVICE_TOOLS, "confirm_appointment", "opt_out")
GLOBAL_TOOLS = ("transfer_to_advisor", "end_call")
#: The consent question for text confirmations (asked once, when a result says so).
TEXT_CONSENT_LINE = (
    'If that result has "text": "ask_consent", ask once: "Can I text you the '
    'confirmation?" and call record_text_consent with their answer; if it has '
    '"text": "will_text", you may say a text confirmation is on its way.'
)

#: How the model uses the account overview that comes with a successful verification.
OVERVIEW_LINE = (
    "The verification result already lists their vehicles (vehicle_id, name, service_due) "
    "and upcoming appointments (appointment_id, when, services, vehicle): use them as they "
    "are, without calling get_vehicle_history or list_appointments for the same facts. "
    "Call get_vehicle_history only for mileage, past visits, recalls or warranty. If it "
    "holds availability for the service they asked for, offer those slots as they are."
)
#: Tools whose call keeps the caller waiting on the database or the calendar, and usually
#: on another LLM round trip after it: a reply that starts with one of them gets a short
#: spoken acknowledgement first (:class:`processors.tool_acknowledgement.ToolAcknowledgement`).
ACKNOWLEDGED_TOOLS = (*IDENTIFY_TOOLS, *SERVICE_TOOLS, "confirm_appointment")
#: Tools that end or hand over the call, or just record an answer, and are followed at once
#: by their own sentence: no acknowledgement. Every registered tool is in exactly one of
#: the two sets (tests/test_tool_acknowledgement.py).
UNACKNOWLEDGED_TOOLS = ("transfer_to_advisor", "end_call", "opt_out", "record_text_consent")

TransferFn = Callable[[], Awaitable[None]]


class CallFlow:
    """Builds the nodes of one call and maps tool results to transitions.

    Args:
        ctx: Tool context of the call.
        scenario: ``inbound``, ``service_due`` or ``confirmation``.
        greeting: Fixed first sentence (AI disclosure included).
        transfer: Coroutine that hands the live call to an advisor (telephony side).
    """

    def __init__(
        self, *, ctx: ToolContext, scenario: str, greeting: str, transfer: TransferFn
    ) -> None:
        self.ctx = ctx
        self.scenario = scenario
        self.greeting = greeting
        self._transfer = transfer
        self.manager: FlowManager | None = None

    # -- functions -------------------------------------------------------------------

    def function(self, name: str) -> FlowsFunctionSchema:
        """A Flows function for a registered tool."""
        schema = TOOLS[name].schema

        async def handler(args: FlowArgs, flow_manager: FlowManager) -> tuple[Any, Any]:
            try:
                result = await run_tool(self.ctx, name, dict(args))
            except asyncio.CancelledError:
                await self._report_late_result(name, flow_manager)
                raise
            self.ctx.session.flow_node = flow_manager.current_node
            # Dates and times read back in the call's language (Spanish labels).
            spoken = localize_result(result, self.ctx.session.language)
            return spoken, self.next_node(name, result)

        return FlowsFunctionSchema(
            name=schema.name,
            description=schema.description,
            properties=schema.properties,
            required=list(schema.required),
            handler=handler,
            cancel_on_interruption=True,
        )

    async def _report_late_result(self, name: str, flow_manager: FlowManager) -> None:
        late = self.ctx.session.late_results
        if not late or late[-1]["tool"] != name:
            return
        result = late[-1]["result"]
        logger.info(f"{name} finished after an interruption (ok={result.get('ok')})")
        await flow_manager.worker.queue_frame(
            LLMMessagesAppendFrame(
                messages=[
                    {
                        "role": "developer",
                        "content": f"The interrupted {name} call did finish with this result: "
                        f"{json.dumps(result, default=str)}. Tell the caller the outcome.",
                    }
                ],
                run_llm=False,
            )
        )

    def global_functions(self) -> list[FlowsFunctionSchema | FlowsDirectFunction]:
        """Functions available at every node."""
        return [self.function(name) for name in GLOBAL_TOOLS]

    # -- transitions -----------------------------------------------------------------

    def next_node(self, name: str, result: dict[str, Any]) -> NodeConfig | None:
        """The node a tool result leads to, or ``None`` to stay."""
        if not result.get("ok"):
            return None
        if name == "verify_customer" and result.get("verified"):
            return self.service_node()
        if name in ("book_appointment", "reschedule_appointment", "confirm_appointment"):
            return self.confirm_node(name)
        if name == "cancel_appointment":
            return self.confirm_node(name)
        if name == "transfer_to_advisor" and result.get("transferring"):
            return self.transfer_node()
        if name in ("end_call", "opt_out") and result.get("ending"):
            return self.end_node(goodbye=result.get("say"))
        return None

    # -- nodes -----------------------------------------------------------------------

    def initial_node(self) -> NodeConfig:
        """Greeting (fixed text, AI disclosure) then identification and verification."""
        if self.scenario == "inbound":
            task = (
                "You have just greeted the caller. Find out what they need. Before anything "
                "about their vehicles, history or appointments, identify and verify them: if "
                "caller ID matched, ask for ONE of date of birth, ZIP code or the last four "
                "of a VIN; otherwise find their record with lookup_customer first and ask "
                "for TWO of them. If they already said which service they want, pass its "
                "code to verify_customer as service_type: its result then holds the open "
                "slots too. General questions (hours, services, prices) need no "
                "verification."
            )
            names = (*IDENTIFY_TOOLS, "check_availability")
        else:
            task = (
                "You have just introduced yourself. Make sure you are speaking with the "
                "customer, then verify them with verify_customer before mentioning any "
                "vehicle or appointment."
            )
            names = (*IDENTIFY_TOOLS, "opt_out")
        return {
            "name": "identify",
            "task_messages": [{"role": "developer", "content": task}],
            "functions": [self.function(n) for n in names],
            "pre_actions": [{"type": "tts_say", "text": self.greeting}],
            "respond_immediately": False,
        }

    def service_node(self) -> NodeConfig:
        """What they need: vehicles, history, availability, booking changes."""
        if self.scenario == "inbound":
            task = (
                f"The caller is verified. {OVERVIEW_LINE} Greet them by first name and help "
                "with what they need: ask which vehicle when it matters (by name), then "
                "schedule (check_availability), reschedule or cancel, or answer questions "
                "about service history (get_vehicle_history). Before booking, confirm the "
                "service, the day and time, the vehicle and transportation (waiter, drop off, "
                "loaner or shuttle)."
            )
            names = SERVICE_TOOLS
        elif self.scenario == "service_due":
            task = (
                f"The customer is verified. {OVERVIEW_LINE} Tell them which vehicle is due "
                "for service (service_due) and offer to book it."
            )
            names = OUTBOUND_TOOLS
        else:
            task = (
                f"The customer is verified. {OVERVIEW_LINE} Read their upcoming appointment "
                "back and ask whether they will make it."
            )
            names = OUTBOUND_TOOLS
        return {
            "name": "service",
            "task_messages": [{"role": "developer", "content": task}],
            "functions": [self.function(n) for n in names],
        }

    def confirm_node(self, after: str) -> NodeConfig:
        """Read back what was done, then ask whether there is anything else."""
        what = {
            "book_appointment": "the booking",
            "reschedule_appointment": "the new appointment",
            "confirm_appointment": "the confirmed appointment",
            "cancel_appointment": "the cancellation",
        }[after]
        return {
            "name": "confirm",
            "task_messages": [
                {
                    "role": "developer",
                    "content": f"Read back {what} from the last tool result: the day and time, "
                    "the vehicle, the transportation and the confirmation code spelled "
                    "character by character (skip what does not apply). "
                    f"{TEXT_CONSENT_LINE} Then ask whether there is anything else. If not, "
                    "say goodbye and call end_call.",
                }
            ],
            "functions": [
                self.function(n)
                for n in (
                    *(SERVICE_TOOLS if self.scenario == "inbound" else OUTBOUND_TOOLS),
                    "record_text_consent",
                )
            ],
        }

    def transfer_node(self) -> NodeConfig:
        """One sentence, then the live call is redirected to the advisor line."""

        async def redirect(action: dict, flow_manager: FlowManager) -> None:
            await self._transfer()

        return {
            "name": "transfer",
            "task_messages": [
                {"role": "developer", "content": "The call is being transferred to an advisor."}
            ],
            "functions": [],
            "pre_actions": [
                {
                    "type": "tts_say",
                    "text": "I'll connect you with a service advisor now. One moment please.",
                },
                {"type": "function", "handler": redirect},
            ],
            "respond_immediately": False,
        }

    def end_node(self, *, goodbye: str | None = None) -> NodeConfig:
        """Hang up once everything queued (and ``goodbye``, if given) has been spoken."""
        action: ActionConfig = {"type": "end_conversation"}
        if goodbye:
            action["text"] = goodbye
        return {
            "name": "end",
            "task_messages": [{"role": "developer", "content": "The call is over."}],
            "functions": [],
            "pre_actions": [action],
            "respond_immediately": False,
        }

"""LLM tools grouped by business area.

Importing this package registers every tool in :data:`tools.registry.TOOLS`.
"""

from tools import appointments, customers, handoff, outbound, texting, vehicles
from tools.context import ToolContext
from tools.registry import TOOLS, ToolRefusal, run_tool

__all__ = [
    "TOOLS",
    "ToolContext",
    "ToolRefusal",
    "appointments",
    "customers",
    "handoff",
    "outbound",
    "run_tool",
    "texting",
    "vehicles",
]

"""LLM tools grouped by business area.

Importing this package registers every tool in :data:`tools.registry.TOOLS`.
"""

from tools import customers, handoff, outbound, scheduling, vehicles
from tools.registry import TOOLS, ToolContext, ToolRefusal, run_tool

__all__ = [
    "TOOLS",
    "ToolContext",
    "ToolRefusal",
    "customers",
    "handoff",
    "outbound",
    "run_tool",
    "scheduling",
    "vehicles",
]

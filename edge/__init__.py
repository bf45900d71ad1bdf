"""The edge runtime: config, pipelines, tiers, rules, governance and the link to the cloud.

The door: `load_config` / `Config`, `Runtime` (an async context manager) and `run`, the messages
it puts on the wire, the link's state machines, the embedded `NatsServer`, and the error tree.
The fleet protocol and service are `edge.fleet`, the command line `edge.cli`, and the tools for
people and tests (demo, fault proxy, cloud simulator, bench) `edge.tools`; the runtime never
imports the command line or the tools.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._config import BUNDLED_CONFIG, Config, config_to_toml, decode_config, encode_config, load_config
from ._errors import CommandError, ConfigError, EdgeError, InputRejected, Problem, RuleError, ServerError
from ._link import BreakerState, CircuitBreaker, CloudLink, LinkState
from ._messages import (
    ApprovalReply,
    ApprovalRequest,
    CloudReply,
    CrossCheck,
    Decision,
    Fallback,
    Governance,
    Heartbeat,
    ModelRef,
    Rejected,
    ShadowResult,
)

if TYPE_CHECKING:  # imported on first use (below), so `edge fleet ls` does not pay for the runtime
    from ._nats_server import NatsServer, nats_server_binary
    from ._natsutil import server_barrier
    from ._replay import Replayer, ReplayReport
    from ._report import ValueReport, plot_report, report_text, value_report
    from ._runtime import Runtime, RuntimeState, run

_LAZY = {
    "NatsServer": "._nats_server",
    "nats_server_binary": "._nats_server",
    "server_barrier": "._natsutil",
    "Runtime": "._runtime",
    "RuntimeState": "._runtime",
    "run": "._runtime",
    "Replayer": "._replay",
    "ReplayReport": "._replay",
    "ValueReport": "._report",
    "plot_report": "._report",
    "report_text": "._report",
    "value_report": "._report",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BUNDLED_CONFIG",
    "ApprovalReply",
    "ApprovalRequest",
    "BreakerState",
    "CircuitBreaker",
    "CloudLink",
    "CloudReply",
    "CrossCheck",
    "CommandError",
    "Config",
    "ConfigError",
    "Decision",
    "EdgeError",
    "Fallback",
    "Governance",
    "Heartbeat",
    "InputRejected",
    "LinkState",
    "ModelRef",
    "NatsServer",
    "Problem",
    "Rejected",
    "ReplayReport",
    "Replayer",
    "RuleError",
    "Runtime",
    "RuntimeState",
    "ServerError",
    "ShadowResult",
    "ValueReport",
    "config_to_toml",
    "decode_config",
    "encode_config",
    "load_config",
    "nats_server_binary",
    "plot_report",
    "report_text",
    "run",
    "server_barrier",
    "value_report",
]

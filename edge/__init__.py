"""The edge runtime: config, pipelines, tiers, rules, governance, link, fleet and the CLI.

The door: `load_config` / `Config`, `Runtime` (an async context manager), the link's state
machines, the embedded `NatsServer`, and the error tree. `edge.chaos` (the fault proxy) and
`edge.cloudsim` (the simulated cloud) are public modules for tests and demos.
"""

from ._config import Config, decode_config, load_config
from ._errors import CommandError, ConfigError, EdgeError, InputRejected, Problem, RuleError, ServerError
from ._link import BreakerState, CircuitBreaker, CloudLink, LinkState
from ._nats_server import NatsServer
from ._runtime import Runtime, RuntimeState, run

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "CloudLink",
    "CommandError",
    "Config",
    "ConfigError",
    "EdgeError",
    "InputRejected",
    "LinkState",
    "NatsServer",
    "Problem",
    "RuleError",
    "Runtime",
    "RuntimeState",
    "ServerError",
    "decode_config",
    "load_config",
    "run",
]

"""The edge runtime: config, pipelines, tiers, rules, governance, link, fleet and the CLI."""

from ._errors import CommandError, ConfigError, EdgeError, InputRejected, Problem, RuleError, ServerError
from ._nats_server import NatsServer

__all__ = [
    "CommandError",
    "ConfigError",
    "EdgeError",
    "InputRejected",
    "NatsServer",
    "Problem",
    "RuleError",
    "ServerError",
]

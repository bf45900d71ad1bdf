"""Alias kept for older imports: the fault proxy lives in `edge.tools.chaos`."""

from edge.tools.chaos import Fault, FaultKind, FaultProxy

__all__ = ["Fault", "FaultKind", "FaultProxy"]

"""Alias kept for older imports: the simulated cloud lives in `edge.tools.cloudsim`."""

from edge.tools.cloudsim import AutoApprover, CloudSimulator

__all__ = ["AutoApprover", "CloudSimulator"]

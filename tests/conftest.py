"""Shared fixtures: real nats-server processes on free ports (see tests/nats_harness.py)."""

pytest_plugins = ["tests.nats_harness"]

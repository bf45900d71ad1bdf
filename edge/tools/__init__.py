"""Tools for people and tests, never imported by the runtime: the demo, the fault proxy (`chaos`),
the simulated cloud (`cloudsim`) and the benchmark (`bench`).

Each is a public module of its own, so importing one does not load the others. They use only the
public names of `edge`, `models` and `sync`.
"""

"""The `edge` command: the runtime's commands (run, check, status, audit, models, demo, bench) and
the operator's (`edge fleet ...`, `edge approvals watch`).

Imports onnxruntime only for the commands that load a model.
"""

from ._main import build_parser, main

__all__ = ["build_parser", "main"]

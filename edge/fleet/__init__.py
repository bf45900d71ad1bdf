"""The fleet (SPEC §8): the wire protocol operators and devices share, signatures, config pushes
and model archives, and the device-side service.

`_protocol`, `_signing` and `_archive` import neither the runtime nor onnxruntime: the operator's
command line uses them alone. `Fleet` (in `_service`) speaks for a `Device`, the small protocol of
what it needs of a runtime.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._archive import OBJECT_MARKER, pack_model_folder, pushed_config, unpack_model_archive
from ._protocol import (
    REPLY_DECODER,
    VERBS,
    AuditResend,
    Command,
    ConfigApply,
    ConfigGet,
    ConfigRollback,
    ErrorInfo,
    ModelDeploy,
    ModelPromote,
    ModelRollback,
    Pause,
    Reply,
    Resume,
    Status,
    SyncNow,
    decode_command,
    encode_reply,
    verb_of,
)
from ._signing import (
    H_NONCE,
    H_SIGNATURE,
    H_SIGNER,
    H_TIMESTAMP,
    CommandVerifier,
    SignatureVerifier,
    approval_bytes,
    audit_bytes,
    command_bytes,
    is_signed,
    load_seed,
    model_bytes,
    new_seed,
    public_key_of,
    sign,
    sign_approval,
    sign_command,
    sign_model,
    verify_artifact,
    verify_signature,
)

if TYPE_CHECKING:  # imported on first use (below): the operator's side never loads the device service
    from ._service import MAX_IN_FLIGHT, Deployer, Device, Fleet, FleetState

_SERVICE_NAMES = frozenset({"MAX_IN_FLIGHT", "Deployer", "Device", "Fleet", "FleetState"})


def __getattr__(name: str) -> Any:
    if name not in _SERVICE_NAMES:
        raise AttributeError(f"module 'edge.fleet' has no attribute {name!r}")
    value = getattr(importlib.import_module("._service", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "H_NONCE",
    "H_SIGNATURE",
    "H_SIGNER",
    "H_TIMESTAMP",
    "MAX_IN_FLIGHT",
    "OBJECT_MARKER",
    "REPLY_DECODER",
    "VERBS",
    "AuditResend",
    "Command",
    "CommandVerifier",
    "ConfigApply",
    "ConfigGet",
    "ConfigRollback",
    "Deployer",
    "Device",
    "ErrorInfo",
    "Fleet",
    "FleetState",
    "ModelDeploy",
    "ModelPromote",
    "ModelRollback",
    "Pause",
    "Reply",
    "Resume",
    "SignatureVerifier",
    "Status",
    "SyncNow",
    "approval_bytes",
    "audit_bytes",
    "command_bytes",
    "decode_command",
    "pack_model_folder",
    "pushed_config",
    "encode_reply",
    "is_signed",
    "load_seed",
    "model_bytes",
    "new_seed",
    "public_key_of",
    "sign",
    "sign_approval",
    "sign_command",
    "sign_model",
    "unpack_model_archive",
    "verb_of",
    "verify_artifact",
    "verify_signature",
]

"""The `edge` command line (SPEC §3). Exit codes: 0 success, 1 runtime failure, 2 bad usage or input."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._config import Config, connect_options, load_config
from .._errors import EdgeError
from ._output import (
    EXIT_FAILURE,
    EXIT_OK,
    EXPECTED_ERRORS,
    exit_code_for,
    local_url,
    print_json,
    run_async,
    setup_logging,
)

# A record's body in text output: whole (a command record must show which command), up to a bound
# that keeps one huge record (a pushed config) from flooding a terminal. --json is never cut.
TEXT_BODY_CHARS = 2000

# -- commands --------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(Path(args.file))
    if args.json:
        print_json({"ok": True, "file": args.file, "device_id": config.device_id,
                    "pipelines": [p.name for p in config.pipelines]})
    else:
        print(f"{args.file}: ok ({len(config.pipelines)} pipeline(s), {len(config.models)} model(s))")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .._runtime import run

    config = _load(args)
    if args.log_level is None:  # the config's log_level, unless the command line says otherwise
        logging.getLogger().setLevel(config.log_level.upper())
    run_async(run(config, config_path=Path(args.config) if args.config else None))
    return EXIT_OK


def cmd_models_inspect(args: argparse.Namespace) -> int:
    from models import inspect_model  # loads onnxruntime: only this command needs it

    info = inspect_model(Path(args.path))
    if args.json:
        print_json(info)
        return EXIT_OK
    for key, value in info.items():
        if isinstance(value, list) and value:
            print(f"{key}:")
            for item in value:
                print(f"  {_tensor_text(item) if isinstance(item, dict) else _shown(item)}")
        elif isinstance(value, dict) and value:
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k} = {_shown(v)}")
        else:
            print(f"{key}: {_shown(value)}")
    return EXIT_OK


def _shown(value: Any) -> str:
    """A value in text output: words for yes/no/none, JSON for containers, never a Python repr."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or value == [] or value == {}:
        return "none"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _tensor_text(tensor: dict[str, Any]) -> str:
    """`input  tensor(float)  [?, 4]` (`?`: a dynamic dimension)."""
    if set(tensor) != {"name", "type", "shape"}:
        return _shown(tensor)
    dims = ", ".join("?" if d is None else str(d) for d in tensor["shape"] or [])
    return f"{tensor['name']}  {tensor['type']}  [{dims}]"


# -- audit ------------------------------------------------------------------------------------------


def _audit_db(args: argparse.Namespace) -> Path:
    if args.db:
        path = Path(args.db)
    else:
        config = _load(args)
        path = config.resolve(config.data_dir) / "audit.db"
    if not path.exists():
        raise FileNotFoundError(f"no audit log at {path} (use --db or -c)")
    return path


def _since_ns(text: str | None) -> int | None:
    if not text:
        return None
    from .._config import parse_duration

    try:
        return time.time_ns() - int(parse_duration(text) * 1e9)
    except ValueError:
        pass
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(text).timestamp() * 1e9)
    except ValueError:
        raise EdgeError(f"--since: expected a duration such as '10m' or an ISO time, got {text!r}") from None


def _record_dict(record: Any) -> dict[str, Any]:
    import msgspec

    return {"device": record.device, "seq": record.seq, "ts": record.ts, "kind": record.kind,
            "body": msgspec.json.decode(record.body), "prev": record.prev, "hash": record.hash}


def _print_records(records: Sequence[Any], as_json: bool) -> None:
    for record in records:
        if as_json:
            sys.stdout.write(json.dumps(_record_dict(record)) + "\n")
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.ts / 1e9))
            body = bytes(record.body).decode(errors="replace")
            if len(body) > TEXT_BODY_CHARS:
                body = f"{body[:TEXT_BODY_CHARS]}... ({len(body) - TEXT_BODY_CHARS} more characters; --json shows all)"
            print(f"{record.seq:>8}  {when}  {record.kind:<16} {body}")


def _full_decisions(db: Path, records: Iterable[Any]) -> Iterator[str]:
    """The Decision of each decision record among `records`, as JSON: a record keeps only what is
    specific to its decision; the rest (device, model, audit_seq) is read back from the log. With
    the input recorded (audit.inputs = "full"), it is there as `input`."""
    import msgspec

    from sync import iter_records

    from .._records import MODEL_KIND, DecisionReader

    reader = DecisionReader()
    reader.remember(iter_records(db, kinds=[MODEL_KIND]))
    for recorded in reader.decisions(records):
        line = msgspec.to_builtins(recorded.decision)
        if recorded.input is not None:
            line["input"] = recorded.input
        yield json.dumps(line)


def _print_selected(db: Path, records: Iterable[Any], args: argparse.Namespace) -> None:
    if args.decisions:
        for line in _full_decisions(db, records):
            sys.stdout.write(line + "\n")
    else:
        _print_records(list(records), args.json)


def _kinds(args: argparse.Namespace) -> list[str] | None:
    return ["decision"] if args.decisions else (args.kind or None)


def cmd_audit_tail(args: argparse.Namespace) -> int:
    from collections import deque

    from sync import iter_records

    db = _audit_db(args)
    last = deque(iter_records(db, kinds=_kinds(args)), maxlen=args.n)
    _print_selected(db, last, args)
    return EXIT_OK


def cmd_audit_query(args: argparse.Namespace) -> int:
    from itertools import islice

    from sync import iter_records

    db = _audit_db(args)
    records = iter_records(db, from_seq=args.from_seq, to_seq=args.to_seq, kinds=_kinds(args),
                           since_ns=_since_ns(args.since))
    _print_selected(db, list(islice(records, args.limit)), args)
    return EXIT_OK


def cmd_audit_export(args: argparse.Namespace) -> int:
    from sync import iter_records

    db = _audit_db(args)
    records = iter_records(db, from_seq=args.from_seq, to_seq=args.to_seq, kinds=_kinds(args),
                           since_ns=_since_ns(args.since))
    lines = (_full_decisions(db, records) if args.decisions
             else (json.dumps(_record_dict(record), separators=(",", ":")) for record in records))
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # closed below
    count = 0
    try:
        for line in lines:
            out.write(line + "\n")
            count += 1
    finally:
        if out is not sys.stdout:
            out.close()
    if args.out:
        print(f"exported {count} records to {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from sync import verify_chain

    if args.upstream:
        return run_async(_verify_upstream(args))
    report = verify_chain(_audit_db(args))
    if args.json:
        import msgspec

        print_json(msgspec.to_builtins(report))
    else:
        print(report.summary())
    return EXIT_OK if report.ok else EXIT_FAILURE


async def _verify_upstream(args: argparse.Namespace) -> int:
    import msgspec
    import nats

    from sync import verify_upstream

    server = args.server
    stream = args.stream
    device = args.device
    key = args.key
    options: dict[str, Any] = {}
    if not server or not device or args.config:
        config = _load(args)
        if not server:  # the device's own upstream, with the device's credentials
            server = config.nats.upstream or local_url(config)
            auth = config.nats.upstream_auth if config.nats.upstream else config.nats.local_auth
            options = connect_options(auth, Path(config.base_dir or "."))
        device = device or config.device_id
        stream = stream or config.audit.stream
        if not key and args.config:
            key = _device_key_of(config)
    # The runtime accepts a comma-separated list of upstream URLs (a cluster): so does this.
    servers = [url.strip() for url in server.split(",") if url.strip()]

    async def quiet(exc: Exception) -> None:  # one unreachable server of the list is no traceback
        logging.getLogger("edge.cli").debug("upstream: %s", exc)

    nc = await nats.connect(servers, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=1,
                            error_cb=quiet, **options)
    try:
        reports = await verify_upstream(nc.jetstream(), stream or "EDGE_AUDIT", device, key=key or None)
    finally:
        await nc.close()
    ok = bool(reports) and all(r.ok for r in reports.values())
    if args.json:
        print_json({name: msgspec.to_builtins(r) for name, r in reports.items()})
    else:
        if not reports:
            print(f"no records of {device} in stream {stream}")
        for report in reports.values():
            print(report.summary())
        if reports and not key:
            print("signatures were checked only against the key each names: give the device's key with --key "
                  "(its `status` shows device_key) to check they are the device's")
    return EXIT_OK if ok else EXIT_FAILURE


def _public_key(text: str) -> str:
    from sync import is_public_key

    if not is_public_key(text):
        raise argparse.ArgumentTypeError(f"expected the device's public nkey ('U...', as `status` shows it as "
                                         f"device_key), got {text[:60]!r}")
    return text


def _device_key_of(config: Config) -> str:
    """The public key of the device key this config names, when this machine can read it ("" if not).

    A convenience on the device itself: the key the device signs with is what `--key` should be,
    and an operator checking from elsewhere gives the key recorded when the device was set up."""
    from sync import AuditSigner

    from ..fleet import load_seed

    configured = config.fleet.device_key
    path = config.resolve(configured) if configured else config.resolve(config.data_dir) / "device.nk"
    try:
        return AuditSigner(load_seed(path)).public_key
    except EXPECTED_ERRORS:
        return ""


# -- demo and bench: their own option parsers ----------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from edge.tools.demo import main as demo_main

    logging.getLogger().handlers.clear()  # the demo logs to a file: the terminal is its live view
    return demo_main(args.rest)


def cmd_bench(args: argparse.Namespace) -> int:
    from edge.tools.bench import main as bench_main

    return bench_main(args.rest)


def _load(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if getattr(args, "config", None) else None)


# -- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description="Edge AI orchestrator runtime.")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="default: info (for edge run, the config's log_level)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add("run", cmd_run, "run the runtime until SIGINT/SIGTERM, then drain")
    p.add_argument("-c", "--config", help="config file (default: the bundled example)")

    for name, handler, help_text in (
        ("demo", cmd_demo, "the whole story on one machine: outage, recovery, verified audit (--help for options)"),
        ("bench", cmd_bench, "the benchmark: the runtime against a bare service, side by side (--help for options)"),
    ):
        # Their options are their own parsers' (see main): everything after the name goes there.
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(handler=handler, passthrough=True)

    from ._init import register_init
    from ._keys import register_keys
    from ._operator import register
    from ._reference import register_reference
    from ._send import register_send
    from ._value import register_value

    register(sub, add)
    register_send(sub, add)
    register_reference(sub, add)
    register_keys(sub, add)
    register_value(sub, add)
    register_init(sub, add)

    p = add("check", cmd_check, "validate a config file")
    p.add_argument("file")

    models = sub.add_parser("models", help="model files").add_subparsers(dest="models_command", required=True)
    p = add("inspect", cmd_models_inspect, "print a model's inputs, outputs, manifest and sha256", models)
    p.add_argument("path")
    audit = sub.add_parser("audit", help="read and verify the local audit log").add_subparsers(
        dest="audit_command", required=True)

    def audit_command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> Any:
        p = add(name, handler, help_text, audit)
        p.add_argument("-c", "--config", help="config file (default: the bundled example); finds data_dir")
        p.add_argument("--db", help="the audit log file itself (instead of -c)")
        p.add_argument("--kind", action="append", help="only records of this kind (repeatable)")
        if name != "verify":
            p.add_argument("--decisions", action="store_true",
                           help="print the full Decisions the decision records hold (device, model and "
                                "audit_seq filled in from the log), one JSON object a line")
        return p

    p = audit_command("tail", cmd_audit_tail, "the last records")
    p.add_argument("-n", type=int, default=20)
    for name, handler, help_text in (("query", cmd_audit_query, "records by seq, kind and time"),
                                     ("export", cmd_audit_export, "records as JSON lines")):
        p = audit_command(name, handler, help_text)
        p.add_argument("--from-seq", type=int, default=1)
        p.add_argument("--to-seq", type=int)
        p.add_argument("--since", help="a duration back from now ('10m', '2h') or an ISO time")
        if name == "query":
            p.add_argument("--limit", type=int, default=1000)
        else:
            p.add_argument("--out", help="file to write (default: stdout)")
    p = audit_command("verify", cmd_audit_verify, "check the hash chain (locally, or the upstream stream)")
    p.add_argument("--upstream", action="store_true", help="verify the JetStream stream instead of the file")
    p.add_argument("--server", help="upstream NATS URL (default: from the config)")
    p.add_argument("--stream", help="stream name (default: from the config)")
    p.add_argument("--device", help="device id (default: from the config)")
    p.add_argument("--key", type=_public_key, help="the device's public key (U...): every signature must verify "
                   "with it and the newest record must be signed (default: the device key of -c, if readable here)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(args.log_level or "info", args.log_format)
    started = time.monotonic()
    try:
        code: int = args.handler(args)
    except EXPECTED_ERRORS as exc:
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return EXIT_OK
    logging.getLogger("edge.cli").debug("done in %.3fs", time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())

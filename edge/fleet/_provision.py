"""Hub permissions: an nkey per identity and a nats-server config fragment that lets each do its job.

`provision(out, identities)` writes `out/NAME.nk` (a bare user nkey seed, 0600; `out` is 0700)
for every identity and `out/hub-auth.conf`, an `authorization { users = [...] }` block for a hub
config to `include`. Every user logs in with its nkey; there is no `no_auth_user`, so a connection
without credentials is refused. All users share the hub's global account, in which JetStream is
enabled when the hub config turns it on: no `accounts` block is needed.

What each role needs, read from what the code does on the hub (nats-py 2.16, nats.micro):

device <id> (connects with inbox prefix `_INBOX_<id>`, so its replies and JetStream answers come
to subjects no other identity may subscribe to)
    publish   audit.<id>                                the uploader (JetStream publish, ack to its inbox)
              edge.<id>.>                               decisions, rejected, heartbeats, approval requests
              cloud.infer.>                             the cloud tier's requests and the link probe
              _edge.probe.<id>, _edge.barrier.*         the probe without a cloud subject; server_barrier
              $JS.API.STREAM.INFO.<stream>              the uploader checks the audit stream
              $JS.API.DIRECT.GET.<stream>.audit.<id>    ... and reads its own last record, and only its own
              per model bucket B (stream OBJ_B), read only, for model.deploy's object store `get_info`/`get`:
              $JS.API.STREAM.INFO.OBJ_B                 `js.object_store(B)`
              $JS.API.STREAM.MSG.GET.OBJ_B              `get_info`: the last message on `$O.B.M.<name>`
              $JS.API.DIRECT.GET.OBJ_B.$O.B.M.*         the same read by clients that use direct gets
              $JS.API.STREAM.NAMES                      `js.subscribe` finds the stream of `$O.B.C.<nuid>`
              $JS.API.CONSUMER.CREATE.OBJ_B[.>]         the ordered consumer that streams the chunks
              $JS.API.CONSUMER.DELETE.OBJ_B.*           ... which clients may delete when done
              $JS.FC.OBJ_B.>                            its flow-control answers
              desired state, read only (the stream KV_EDGE_FLEET), for the watch edge.fleet._convergence keeps:
              $JS.API.CONSUMER.CREATE.KV_EDGE_FLEET     an ordered consumer (nats-py names none, so the
                                                        filter cannot be confined here: a device may read
                                                        every desired value, never write one)
              $JS.API.CONSUMER.INFO.KV_EDGE_FLEET.*     how many current values to wait for
              $JS.FC.KV_EDGE_FLEET.>                    its flow-control answers
              $KV.EDGE_FLEET_STATUS.device.<id>         its own report (JetStream publish, ack to its inbox)
    subscribe _INBOX_<id>.>                             replies, acks, API answers, chunk delivery
              edge.<id>.cmd.>, edge.group.<g>.cmd.> for each group, edge.all.cmd.>
              edge.<id>.svc.status                      the nats.micro endpoint
              $SRV.PING|INFO|STATS, .edge, .edge.*      nats.micro discovery (`*`: the service id, a NUID)
    allow_responses                                     answers to commands and `$SRV` requests
    Not: another device's audit, `edge.<other>.>`, commands or inbox; cloud or approval requests;
    any stream's CREATE/UPDATE/DELETE/PURGE, MSG.DELETE, a stream-wide MSG.GET of the audit stream;
    writing a model bucket (`$O.B.>`).

operator <name> (the `edge fleet` command line: default inbox prefix `_INBOX`)
    publish   edge.*.cmd.>, edge.group.*.cmd.>, edge.all.cmd.>, edge.*.svc.status, $SRV discovery,
              _edge.barrier.*, $JS.API.INFO, $JS.API.STREAM.NAMES
              audit stream: STREAM.CREATE|UPDATE|DELETE|INFO, STREAM.MSG.GET, DIRECT.GET[.>],
              CONSUMER.CREATE[.>], CONSUMER.DELETE|INFO, $JS.FC (read it, configure it; never
              purge it or delete a record, never publish `audit.>`)
              model buckets: STREAM.*.OBJ_B, STREAM.MSG.*.OBJ_B, DIRECT.GET.OBJ_B[.>],
              CONSUMER.*.OBJ_B[.>], $O.B.> (chunks and metadata), $JS.FC.OBJ_B.>
              desired state KV_EDGE_FLEET: STREAM.CREATE|INFO, STREAM.MSG.GET, DIRECT.GET[.>],
              CONSUMER.CREATE[.>], CONSUMER.INFO|DELETE, $JS.FC, and $KV.EDGE_FLEET.> (writes)
              reported state KV_EDGE_FLEET_STATUS: the same but $KV.EDGE_FLEET_STATUS.> (devices write it)
              staged rollouts KV_EDGE_ROLLOUTS: the same as desired state, $KV.EDGE_ROLLOUTS.> (devices
              have no access: a rollout runs in the operator's command line)
    subscribe _INBOX.>, edge.*.heartbeat

approver <name> / cloud <name>
    publish   _edge.barrier.* (and answers, through allow_responses)
    subscribe edge.*.approval.> / cloud.infer.> (any queue group), and _INBOX_<name>.> (their tools
              connect with that inbox prefix)

Leaf nodes (a device with `nats.upstream = "nats-leaf://..."`): nats-server 2.15's
`leafnodes { authorization }` takes one user, without nkeys or permissions ("unknown field"), so
per-device leaf logins cannot live there. With no authorization block of its own, the hub's
leafnode listener logs leaf nodes in against the same `authorization` users as clients, and
applies each user's permissions to its leaf connection: `publish` is what the leaf may send into
the hub, `subscribe` what the hub may send to it (verified in tests/test_leaf.py). So the device
entries in the fragment are also its leafnode authorization. A leaf node reaches the hub's
JetStream through its domain (`$JS.<hub_domain>.API.…`, mapped by the hub to `$JS.API.…` after the
permission check), so with `hub_domain` each device may also publish the domain form of each of its
`$JS.API.…` subjects, and `$JS.<hub_domain>.API.INFO`: the leaf link probe (edge._runtime). The
domain forms grant nothing the plain ones do not. One grant is wider than a client's:
`allow_responses` does not cross a leaf connection (nats-io/nats-server#2949, verified on 2.15.1:
the command arrives, its reply is dropped), so a device may publish to `_INBOX.>`, the operators'
inboxes, to answer commands and `$SRV` discovery. It could thus inject a reply into an operator's
pending request (never into another device's, approver's or cloud's inbox: those are
`_INBOX_<name>`); commands stay signed and audit stays confined to the device's own subject.

Subject permissions match whole tokens, so "every bucket whose name begins with models-" cannot be
written as one; the buckets are listed (`models` unless told otherwise) and provisioning again
adds one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, assert_never

import msgspec

from .._errors import ConfigError, Problem
from .._files import write_atomically
from ._desired import BUCKET as DESIRED_BUCKET
from ._desired import STATUS_BUCKET
from ._rollout import BUCKET as ROLLOUT_BUCKET
from ._signing import load_seed, new_seed, public_key_of

Role = Literal["device", "operator", "approver", "cloud"]
ROLES: tuple[Role, ...] = ("device", "operator", "approver", "cloud")

FRAGMENT = "hub-auth.conf"
DEFAULT_STREAM = "EDGE_AUDIT"
DEFAULT_BUCKETS = ("models",)
DEFAULT_HUB_DOMAIN = "hub"
DOMAIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
BUCKET_NAME = re.compile(r"models(-[A-Za-z0-9_-]{1,64})?")
RESERVED_DEVICE_IDS = frozenset({"all", "group"})
SRV_VERBS = ("PING", "INFO", "STATS")
SERVICE = "edge"  # the nats.micro service every device registers


class Identity(msgspec.Struct, frozen=True):
    """Someone who logs in to the hub: a role, a name (the seed file's and, for a device, its id)."""

    role: Role
    name: str
    groups: tuple[str, ...] = ()


class Permissions(msgspec.Struct, frozen=True):
    """What one user may publish and subscribe to; `allow_responses`: answer what it receives."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


class Provisioned(msgspec.Struct, frozen=True):
    """One identity as written: its key, its seed file, and whether the seed is new or was kept."""

    role: Role
    name: str
    groups: tuple[str, ...]
    public_key: str
    seed_file: str
    seed: Literal["new", "kept"]
    permissions: Permissions


class Provisioning(msgspec.Struct, frozen=True):
    """What `provision` wrote: the fragment, every identity, and seed files it left out of the fragment."""

    out: str
    fragment: str
    stream: str
    hub_domain: str
    buckets: tuple[str, ...]
    identities: tuple[Provisioned, ...]
    unlisted: tuple[str, ...]  # NAME.nk files in `out` of identities not listed: no longer let in


# ---------------------------------------------------------------------------------------------
# Who may do what


def device_permissions(device: str, groups: Sequence[str], *, stream: str = DEFAULT_STREAM,
                       buckets: Sequence[str] = DEFAULT_BUCKETS, hub_domain: str = "") -> Permissions:
    publish = [
        f"audit.{device}",
        f"edge.{device}.>",
        "cloud.infer.>",
        f"_edge.probe.{device}",
        "_edge.barrier.*",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.audit.{device}",
    ]
    if buckets:
        publish.append("$JS.API.STREAM.NAMES")
    for bucket in buckets:
        obj = f"OBJ_{bucket}"
        publish += [
            f"$JS.API.STREAM.INFO.{obj}",
            f"$JS.API.STREAM.MSG.GET.{obj}",
            f"$JS.API.DIRECT.GET.{obj}.$O.{bucket}.M.*",
            f"$JS.API.CONSUMER.CREATE.{obj}",
            f"$JS.API.CONSUMER.CREATE.{obj}.>",
            f"$JS.API.CONSUMER.DELETE.{obj}.*",
            f"$JS.FC.{obj}.>",
        ]
    desired = f"KV_{DESIRED_BUCKET}"
    publish += [  # desired state, read only; reported state, its own key only
        f"$JS.API.CONSUMER.CREATE.{desired}",
        f"$JS.API.CONSUMER.INFO.{desired}.*",
        f"$JS.FC.{desired}.>",
        f"$KV.{STATUS_BUCKET}.device.{device}",
    ]
    if hub_domain:  # the same API requests from a leaf node, through the hub's JetStream domain
        api = "$JS.API."
        publish += [f"$JS.{hub_domain}.API.{s[len(api):]}" for s in publish if s.startswith(api)]
        publish.append(f"$JS.{hub_domain}.API.INFO")
        publish.append("_INBOX.>")  # answers to operators: allow_responses does not cross a leaf link
    subscribe = [
        f"_INBOX_{device}.>",
        f"edge.{device}.cmd.>",
        *(f"edge.group.{group}.cmd.>" for group in groups),
        "edge.all.cmd.>",
        f"edge.{device}.svc.status",
        *_discovery(),
    ]
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe), allow_responses=True)


def operator_permissions(*, stream: str = DEFAULT_STREAM, buckets: Sequence[str] = DEFAULT_BUCKETS) -> Permissions:
    publish = [
        "edge.*.cmd.>",
        "edge.group.*.cmd.>",
        "edge.all.cmd.>",
        "edge.*.svc.status",
        *_discovery(),
        "_edge.barrier.*",
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        *(f"$JS.API.STREAM.{verb}.{stream}" for verb in ("CREATE", "UPDATE", "DELETE", "INFO")),
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]
    for bucket in buckets:
        obj = f"OBJ_{bucket}"
        publish += [
            f"$JS.API.STREAM.*.{obj}",
            f"$JS.API.STREAM.MSG.*.{obj}",
            f"$JS.API.DIRECT.GET.{obj}",
            f"$JS.API.DIRECT.GET.{obj}.>",
            f"$JS.API.CONSUMER.*.{obj}",
            f"$JS.API.CONSUMER.*.{obj}.>",
            f"$O.{bucket}.>",
            f"$JS.FC.{obj}.>",
        ]
    for bucket in (DESIRED_BUCKET, STATUS_BUCKET, ROLLOUT_BUCKET):  # made by operators (devices write reports)
        kv = f"KV_{bucket}"
        publish += [
            *(f"$JS.API.STREAM.{verb}.{kv}" for verb in ("CREATE", "INFO")),
            f"$JS.API.STREAM.MSG.GET.{kv}",
            f"$JS.API.DIRECT.GET.{kv}",
            f"$JS.API.DIRECT.GET.{kv}.>",
            f"$JS.API.CONSUMER.CREATE.{kv}",
            f"$JS.API.CONSUMER.CREATE.{kv}.>",
            f"$JS.API.CONSUMER.INFO.{kv}.*",
            f"$JS.API.CONSUMER.DELETE.{kv}.*",
            f"$JS.FC.{kv}.>",
        ]
    publish += [f"$KV.{DESIRED_BUCKET}.>", f"$KV.{ROLLOUT_BUCKET}.>"]
    return Permissions(publish=tuple(publish), subscribe=("_INBOX.>", "edge.*.heartbeat"))


def approver_permissions(name: str) -> Permissions:
    return Permissions(publish=("_edge.barrier.*",), subscribe=("edge.*.approval.>", f"_INBOX_{name}.>"),
                       allow_responses=True)


def cloud_permissions(name: str) -> Permissions:
    return Permissions(publish=("_edge.barrier.*",), subscribe=("cloud.infer.>", f"_INBOX_{name}.>"),
                       allow_responses=True)


def permissions_for(identity: Identity, *, stream: str = DEFAULT_STREAM,
                    buckets: Sequence[str] = DEFAULT_BUCKETS, hub_domain: str = "") -> Permissions:
    match identity.role:
        case "device":
            return device_permissions(identity.name, identity.groups, stream=stream, buckets=buckets,
                                      hub_domain=hub_domain)
        case "operator":
            return operator_permissions(stream=stream, buckets=buckets)
        case "approver":
            return approver_permissions(identity.name)
        case "cloud":
            return cloud_permissions(identity.name)
        case _:
            assert_never(identity.role)


def _discovery() -> list[str]:
    return [subject for verb in SRV_VERBS
            for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{SERVICE}", f"$SRV.{verb}.{SERVICE}.*")]


# ---------------------------------------------------------------------------------------------
# Names


def parse_device(spec: str) -> Identity:
    """`ID` or `ID:GROUP,GROUP...` as given to `--device` (checked by `check`)."""
    name, sep, groups = spec.partition(":")
    parsed = tuple(dict.fromkeys(g.strip() for g in groups.split(","))) if sep else ()
    return Identity(role="device", name=name.strip(), groups=parsed)


def check(identities: Sequence[Identity], *, stream: str = DEFAULT_STREAM,
          buckets: Sequence[str] = DEFAULT_BUCKETS, hub_domain: str = "") -> Iterator[Problem]:
    """Every problem with what is to be provisioned, each under the option that gave it."""
    if not identities:
        yield Problem("", "nothing to provision: give at least one --device, --operator, --approver or --cloud")
    seen: dict[str, Role] = {}
    for identity in identities:
        where = f"--{identity.role} {identity.name!r}"
        if not NAME.fullmatch(identity.name):
            yield Problem(where, "expected a name of 1 to 64 characters from A-Z a-z 0-9 _ -")
        elif identity.role == "device" and identity.name in RESERVED_DEVICE_IDS:
            yield Problem(where, f"{identity.name!r} is not a device id (it names a command target)")
        elif identity.name in seen:
            yield Problem(where, f"the name is taken by the {seen[identity.name]} {identity.name!r}: each "
                                 f"identity has a seed file of its own, {identity.name}.nk")
        seen.setdefault(identity.name, identity.role)
        for group in identity.groups:
            if not NAME.fullmatch(group):
                yield Problem(where, f"group {group!r}: expected 1 to 64 characters from A-Z a-z 0-9 _ -")
    if not STREAM_NAME.fullmatch(stream):
        yield Problem("--audit-stream", f"{stream!r}: expected a stream name from A-Z a-z 0-9 _ -")
    if hub_domain and not DOMAIN_NAME.fullmatch(hub_domain):
        yield Problem("--hub-domain", f"{hub_domain!r}: expected a JetStream domain from A-Z a-z 0-9 _ -")
    for bucket in buckets:
        if not BUCKET_NAME.fullmatch(bucket):
            yield Problem("--bucket", f"{bucket!r}: model buckets are named 'models' or 'models-<name>' "
                                      "(A-Z a-z 0-9 _ -)")


# ---------------------------------------------------------------------------------------------
# The fragment


def render_fragment(identities: Sequence[Identity], public_keys: Mapping[str, str], *,
                    stream: str = DEFAULT_STREAM, buckets: Sequence[str] = DEFAULT_BUCKETS,
                    hub_domain: str = "") -> str:
    """The `authorization` block for `identities`, each logging in with `public_keys[name]`."""
    counts = ", ".join(f"{n} {role}{'s' if n != 1 else ''}" for role in ROLES
                       if (n := sum(1 for i in identities if i.role == role)))
    lines = [
        f"# {FRAGMENT}: who may do what on the hub, written by `edge fleet provision` ({counts}).",
        f'# Include it from the hub\'s config (include "{FRAGMENT}") with JetStream on. Every user logs',
        "# in with its nkey; a connection without one is refused. Audit stream: "
        f"{stream}; model buckets: {', '.join(buckets) or 'none'}.",
        *(["# Devices may also join as leaf nodes (the hub's leafnodes {} block without an authorization of "
           "its own);", f"# the hub's JetStream domain is {hub_domain!r}."] if hub_domain else []),
        "authorization {",
        "  users = [",
    ]
    for identity in identities:
        perms = permissions_for(identity, stream=stream, buckets=buckets, hub_domain=hub_domain)
        groups = f" (groups: {', '.join(identity.groups)})" if identity.groups else ""
        lines += [
            f"    # {identity.role} {identity.name}{groups}",
            "    {",
            f"      nkey = {_quoted(public_keys[identity.name])}",
            "      permissions = {",
            *_subject_list("publish", perms.publish),
            *_subject_list("subscribe", perms.subscribe),
        ]
        if perms.allow_responses:
            lines.append("        allow_responses = true")
        lines += ["      }", "    },"]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _subject_list(kind: str, subjects: Iterable[str]) -> list[str]:
    # Quoted: an unquoted `$JS...` would be read as a variable reference.
    return [f"        {kind} = {{", "          allow = [",
            *(f"            {_quoted(s)}," for s in subjects), "          ]", "        }"]


def _quoted(text: str) -> str:
    return msgspec.json.encode(text).decode()


# ---------------------------------------------------------------------------------------------
# Writing it all


def provision(out: Path, identities: Sequence[Identity], *, stream: str = DEFAULT_STREAM,
              buckets: Sequence[str] = DEFAULT_BUCKETS, force: bool = False,
              hub_domain: str = DEFAULT_HUB_DOMAIN) -> Provisioning:
    """Write a seed per identity and the fragment for exactly `identities` into `out`.

    A seed file already there is refused unless `force`; with `force` it is kept (its key stays
    valid: adding a device does not lock out the others), and a new one is made for every
    identity that has none. Raises ConfigError (nothing written) for bad names or refused files.
    Blocking file I/O.
    """
    buckets = tuple(dict.fromkeys(buckets))
    problems = list(check(identities, stream=stream, buckets=buckets, hub_domain=hub_domain))
    if problems:
        raise ConfigError(problems, source="provision")
    existing = [i.name for i in identities if (out / f"{i.name}.nk").exists()]
    if existing and not force:
        raise ConfigError([Problem(str(out / f"{name}.nk"), "exists; --force keeps it and writes the rest")
                           for name in existing], source="provision")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)  # the seeds' folder is its owner's alone, whatever the umask made it
    seeds: dict[str, tuple[bytes, Literal["new", "kept"]]] = {}
    for identity in identities:
        path = out / f"{identity.name}.nk"
        if identity.name in existing:
            seeds[identity.name] = (load_seed(path), "kept")
            os.chmod(path, 0o600)
        else:
            seed = new_seed()
            write_atomically(path, seed + b"\n", mode=0o600)
            seeds[identity.name] = (seed, "new")
    keys = {name: public_key_of(seed) for name, (seed, _) in seeds.items()}
    fragment = out / FRAGMENT
    write_atomically(fragment, render_fragment(identities, keys, stream=stream, buckets=buckets,
                                                       hub_domain=hub_domain).encode(),
                     mode=0o644)  # public keys only: the hub's user may need to read it
    listed = {i.name for i in identities}
    return Provisioning(
        out=str(out), fragment=str(fragment), stream=stream, hub_domain=hub_domain, buckets=buckets,
        identities=tuple(
            Provisioned(role=i.role, name=i.name, groups=i.groups, public_key=keys[i.name],
                        seed_file=str(out / f"{i.name}.nk"), seed=seeds[i.name][1],
                        permissions=permissions_for(i, stream=stream, buckets=buckets, hub_domain=hub_domain))
            for i in identities),
        unlisted=tuple(sorted(p.stem for p in out.glob("*.nk") if p.stem not in listed)),
    )

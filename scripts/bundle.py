"""An offline wheelhouse for a device: this project as a wheel and every runtime dependency as a
binary wheel for the target's platform and Python, downloaded here, installed there without a
network.

    python scripts/bundle.py --platform linux/arm64 --python 3.11 --out wheelhouse
    # on the device (copy the folder first):
    python3.11 -m venv /opt/edge
    /opt/edge/bin/pip install --no-index --find-links wheelhouse edge-orchestrator

Two pip commands, printed before they run (`--dry-run` only prints them):

1. `pip wheel --no-deps` builds this project's wheel, and those of the pure-Python dependencies
   published only as source (SOURCE_ONLY): pure Python, so one wheel fits every platform;
2. `pip download --only-binary=:all: --platform ... --python-version ... --implementation cp`
   fetches the dependencies declared in pyproject.toml, with theirs (those of step 1 found in the
   wheelhouse itself). Binary wheels only: a device has no compiler, and a wheel that does not
   exist for the target fails here, not there.

The platform is the manylinux tags of a glibc no newer than the target's (`--glibc`, default
2.28: Debian 10+, Ubuntu 20.04+, RHEL 8+, Raspberry Pi OS bookworm): one `--platform` for each
glibc from that one down to the oldest, and the legacy aliases (manylinux2014...), as pip takes
only the tags it is given (pip 23 does not widen manylinux_2_28 to a wheel tagged manylinux_2_17).
Environment markers in the requirements are judged by pip on this machine, not the target: build
on Linux for a Linux device.

Usage: python scripts/bundle.py [--platform linux/amd64|linux/arm64|TAG] [--python 3.11]
                                [--glibc 2.28] [--extra plot] [--out DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Docker's and uname's names for the two architectures gateways run.
ARCHITECTURES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
# Runtime dependencies PyPI has only as an sdist (checked 2026-12-01): pure Python, built here.
# nkeys 0.2.1: nkeys-0.2.1.tar.gz only; its own dependency, pynacl, ships binary wheels.
SOURCE_ONLY = ("nkeys",)


# The legacy manylinux names, by the glibc they stand for (PEP 600).
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
# The oldest glibc each architecture had manylinux wheels for.
OLDEST_GLIBC = {"x86_64": 5, "aarch64": 17}


def platform_tags(platform: str, glibc: str) -> list[str]:
    """`linux/arm64` → manylinux_2_28_aarch64 ... manylinux_2_17_aarch64, manylinux2014_aarch64;
    a tag with an `_` (pip's own spelling) is taken as it is."""
    if "_" in platform:
        return [platform]
    system, _, name = platform.partition("/")
    if system != "linux" or name not in ARCHITECTURES:
        raise ValueError(f"expected linux/amd64, linux/arm64 or a pip platform tag, got {platform!r}")
    arch = ARCHITECTURES[name]
    major, _, minor = glibc.partition(".")
    if major != "2" or not minor.isdigit() or int(minor) < OLDEST_GLIBC[arch]:
        raise ValueError(f"expected a glibc version 2.{OLDEST_GLIBC[arch]} or newer (such as 2.28), got {glibc!r}")
    tags = []
    for version in range(int(minor), OLDEST_GLIBC[arch] - 1, -1):
        tags.append(f"manylinux_2_{version}_{arch}")
        if version in LEGACY_MANYLINUX:
            tags.append(f"{LEGACY_MANYLINUX[version]}_{arch}")
    return tags


def requirements(extras: list[str]) -> list[str]:
    """The runtime dependencies pyproject.toml declares, and those of the extras asked for."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"no extra {extra!r} in pyproject.toml (known: {', '.join(sorted(optional))})")
        found += optional[extra]
    return found


def _name(requirement: str) -> str:
    """A requirement's project name, normalized: `nkeys>=0.2` → `nkeys`."""
    return re.split(r"[\s;\[<>=!~]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def commands(*, platform: str, python: str, glibc: str, extras: list[str], out: Path) -> list[list[str]]:
    pip = [sys.executable, "-m", "pip"]
    wanted = requirements(extras)
    from_source = [r for r in wanted if _name(r) in SOURCE_ONLY]
    build = [*pip, "wheel", "--no-deps", "--wheel-dir", str(out), str(ROOT), *from_source]
    platforms = [arg for tag in platform_tags(platform, glibc) for arg in ("--platform", tag)]
    download = [*pip, "download", "--only-binary=:all:", *platforms,
                "--python-version", python, "--implementation", "cp", "--find-links", str(out), "--dest", str(out),
                *wanted]
    return [build, download]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bundle.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--platform", default="linux/arm64", help="linux/amd64, linux/arm64, or a pip platform tag")
    parser.add_argument("--python", default="3.11", help="the device's Python, major.minor (default 3.11)")
    parser.add_argument("--glibc", default="2.28", help="the oldest glibc the wheels may need (default 2.28)")
    parser.add_argument("--extra", action="append", default=[], help="an optional extra too (e.g. plot); repeatable")
    parser.add_argument("--out", default="wheelhouse", help="the wheelhouse folder (default ./wheelhouse)")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
    args = parser.parse_args(argv)
    try:
        steps = commands(platform=args.platform, python=args.python, glibc=args.glibc, extras=args.extra,
                         out=Path(args.out).resolve())
    except ValueError as exc:
        parser.error(str(exc))
    for step in steps:
        print(shlex.join(step), flush=True)
        if not args.dry_run:
            result = subprocess.run(step)
            if result.returncode != 0:
                return result.returncode
    if not args.dry_run:
        wheels = sorted(Path(args.out).glob("*.whl"))
        size = sum(w.stat().st_size for w in wheels)
        print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/bundle.py: the offline wheelhouse's command line, with --dry-run (nothing downloaded)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bundle.py"


def bundle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_dry_run_prints_the_project_wheel_and_the_binary_only_download(tmp_path: Path) -> None:
    out = tmp_path / "wheelhouse"
    result = bundle("--platform", "linux/arm64", "--python", "3.11", "--out", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    build, download = (shlex.split(line) for line in result.stdout.splitlines())
    # 1. this project as a wheel, and the pure-Python dependency PyPI has only as source.
    assert build[:4] == [sys.executable, "-m", "pip", "wheel"]
    assert build[4:7] == ["--no-deps", "--wheel-dir", str(out)] and build[7] == str(ROOT)
    assert build[8:] == ["nkeys>=0.2"]
    # 2. every runtime dependency pyproject.toml declares, binary wheels for the target only.
    assert download[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--only-binary=:all:" in download
    platforms = [download[i + 1] for i, arg in enumerate(download) if arg == "--platform"]
    assert platforms[0] == "manylinux_2_28_aarch64" and platforms[-2:] == ["manylinux_2_17_aarch64",
                                                                            "manylinux2014_aarch64"]
    assert download[download.index("--python-version") + 1] == "3.11"
    assert download[download.index("--implementation") + 1] == "cp"
    assert download[download.index("--dest") + 1] == str(out) == download[download.index("--find-links") + 1]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert download[-len(declared):] == declared
    assert not out.exists()  # a dry run writes nothing


def test_amd64_reaches_the_oldest_manylinux_and_extras_are_added(tmp_path: Path) -> None:
    result = bundle("--platform", "linux/amd64", "--glibc", "2.31", "--extra", "plot", "--dry-run")
    assert result.returncode == 0, result.stderr
    download = shlex.split(result.stdout.splitlines()[1])
    platforms = [download[i + 1] for i, arg in enumerate(download) if arg == "--platform"]
    assert platforms[0] == "manylinux_2_31_x86_64"
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(platforms)
    assert download[-1].startswith("matplotlib")


def test_bad_platform_and_extra_are_usage_errors() -> None:
    for args in (["--platform", "windows/arm64"], ["--glibc", "3.1"], ["--extra", "nope"]):
        result = bundle(*args, "--dry-run")
        assert result.returncode == 2 and "bundle.py: error:" in result.stderr, args

"""The environment is exactly uv.lock: runs/setup.sh installs the lock and nothing else (no resolution against the
index at install time), so a fresh machine gets the same packages on any day."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
UV = REPO_ROOT / ".uv" / "bin" / "uv"
LOCAL = {"nanochat", "nanochat-kernels"}  # installed from the checkout, editable, without dependencies


def locked_for_this_environment() -> dict[str, str]:
    """name -> version of every package the lock selects for this interpreter and platform (runtime + [dev])."""
    proc = subprocess.run([str(UV), "export", "--frozen", "--extra", "dev", "--no-emit-project", "--no-hashes",
                           "--no-header", "--no-annotate", "--project", str(REPO_ROOT)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pins = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        name, _, version = requirement.strip().partition("==")
        pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.mark.skipif(not UV.exists(), reason="no .uv/bin/uv: this environment was not made by runs/setup.sh")
def test_installed_packages_equal_the_lock():
    if not sys.prefix.startswith(str(REPO_ROOT / ".venv")):
        pytest.skip(f"not running in the checkout's .venv ({sys.prefix})")
    locked = locked_for_this_environment()
    assert {"torch", "transformers", "pytest", "maturin"} <= set(locked), sorted(locked)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    for name in LOCAL:
        assert name in installed, f"{name} is not installed"
        installed.pop(name)
    missing = {n: v for n, v in locked.items() if n not in installed}
    extra = {n: v for n, v in installed.items() if n not in locked}
    differ = {n: (installed[n], v) for n, v in locked.items() if n in installed and installed[n] != v}
    assert not (missing or extra or differ), f"missing {missing}; not in the lock {extra}; (installed, locked) {differ}"


def test_lock_covers_linux_x86_64_and_aarch64():
    text = (REPO_ROOT / "uv.lock").read_text()
    for machine in ("x86_64", "aarch64"):
        assert f"platform_machine == '{machine}' and sys_platform == 'linux'" in text.split("[[package]]")[0]
    assert "--locked" in (REPO_ROOT / "runs" / "setup.sh").read_text()

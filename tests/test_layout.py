"""The repository's top-level folders never shadow an installed package, and nanochat_kernels imports both as the
editable install and from a built wheel.

transformers imports the PyPI package `kernels`; when our kernels/ folder was a regular package, any Python started
at the repository root (`python -c`, `python -m`, a notebook in the checkout) imported our folder instead and
`import transformers.modeling_utils` failed. The folder now holds the package `nanochat_kernels/` instead of being it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = sorted(p for p in REPO_ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))


def in_repo_root(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c code` started at the repository root, as a user in the checkout would (sys.path[0] is the root)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_no_top_level_folder_is_a_regular_package():
    assert any(p.name == "kernels" for p in TOP_LEVEL), "the scan sees the top level"
    packages = [p.name for p in TOP_LEVEL if (p / "__init__.py").exists()]
    assert not packages, f"top-level folders that are importable packages (they shadow PyPI names): {packages}"


def test_no_top_level_folder_wins_an_import_from_the_root():
    """From the root, each top-level name resolves to an installed package, to nothing, or at most to a namespace
    portion (which any installed regular package of that name beats)."""
    names = [p.name for p in TOP_LEVEL if p.name.isidentifier()]
    code = ("import importlib.util, json, sys\nout = {}\n"
            f"for name in {names!r}:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    out[name] = None if spec is None else spec.origin\n"
            "print(json.dumps(out))")
    proc = in_repo_root(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origins = json.loads(proc.stdout)
    for name, origin in origins.items():
        if origin is not None:
            assert not Path(origin).resolve().is_relative_to(REPO_ROOT / name), (name, origin)


def test_pypi_kernels_and_transformers_import_from_the_root():
    """The failure that blocked CI: with PyPI `kernels` installed (transformers depends on it), `import kernels` from
    the root is the installed package and transformers' modeling code imports."""
    outside = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels')"
                              " is not None)"], cwd="/", capture_output=True, text=True, timeout=120)
    if outside.stdout.strip() != "True":
        pytest.skip("PyPI `kernels` is not installed in this environment (transformers no longer needs it?)")
    proc = in_repo_root("import kernels, transformers.modeling_utils; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "site-packages" in proc.stdout and str(REPO_ROOT / "kernels") not in proc.stdout, proc.stdout


def test_nanochat_kernels_editable_install_points_at_the_checkout():
    import nanochat_kernels

    assert Path(nanochat_kernels.__file__).resolve() == REPO_ROOT / "kernels" / "nanochat_kernels" / "__init__.py"


@pytest.mark.slow
def test_nanochat_kernels_imports_from_a_built_wheel(tmp_path):
    """Build the wheel (setuptools from the locked environment, no isolation), unpack it on its own, import it from a
    neutral folder and check that it is the wheel's copy and that every module of the package is in it."""
    source = tmp_path / "kernels"  # a copy: setuptools writes build/ and egg-info into the folder it builds
    shutil.copytree(REPO_ROOT / "kernels", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("nanochat_kernels-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    sources = sorted(p.name for p in (REPO_ROOT / "kernels" / "nanochat_kernels").glob("*.py"))
    assert {f"nanochat_kernels/{name}" for name in sources} <= names, sorted(names)
    assert not any(name.startswith("kernels/") for name in names), sorted(names)
    code = (f"import sys; sys.path.insert(0, {str(site)!r})\n"
            "import nanochat_kernels, nanochat_kernels.reference, nanochat_kernels.linear_ce_chunked, torch\n"
            "q = torch.randn(1, 4, 2, 8)\n"
            "out = nanochat_kernels.attention(q, q, q, causal=True)\n"
            "print(nanochat_kernels.__file__, tuple(out.shape))")
    env = dict(os.environ, NANOCHAT_KERNELS="reference")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(str(site / "nanochat_kernels" / "__init__.py")), proc.stdout
    assert "(1, 4, 2, 8)" in proc.stdout

"""The package's shape is enforced, not described: the import-linter layer contracts in pyproject.toml hold and fail
on a planted wrong-way import; no import circle exists (function-level imports included); a function-level import
is only for an optional or heavy dependency and says why; ruff's pyflakes and import-order rules pass."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "python" / "nanochat"
KERNELS = REPO_ROOT / "kernels" / "nanochat_kernels"
BIN = Path(sys.executable).parent


def lint_imports(*, python_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if python_path is not None:  # a copy of the packages ahead of the installed ones
        env["PYTHONPATH"] = str(python_path)
    return subprocess.run([str(BIN / "lint-imports"), str(REPO_ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, env=env, timeout=300)


def copy_packages(dest: Path) -> Path:
    shutil.copytree(PACKAGE, dest / "nanochat", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(KERNELS, dest / "nanochat_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    so = next(PACKAGE.glob("_rustbpe*.so"), None)
    if so is not None:
        shutil.copy(so, dest / "nanochat" / so.name)
    return dest


def plant(path: Path, line: str) -> None:
    """Add `line` after the module's `from __future__` import (every module here has one)."""
    text = path.read_text()
    anchor = "from __future__ import annotations\n"
    assert anchor in text, path
    path.write_text(text.replace(anchor, anchor + line + "\n", 1))


def import_cycles(*packages: str, python_path: Path | None = None) -> list[list[str]]:
    """Strongly connected components of more than one module in the import graph of `packages` (grimp sees every
    import statement, at module level or inside functions)."""
    code = f"""
import json, sys, grimp
graph = grimp.build_graph(*{list(packages)!r}, cache_dir=None)
edges = {{m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}}
index, low, stack, on, out, counter = {{}}, {{}}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: out.append(sorted(comp))
for v in sorted(edges):
    if v not in index: visit(v)
print(json.dumps(out))
"""
    env = dict(os.environ)
    if python_path is not None:
        env["PYTHONPATH"] = str(python_path)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_layer_contracts_hold():
    done = lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    contracts = (REPO_ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert contracts >= 4 and f"Contracts: {contracts} kept, 0 broken." in done.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("model/gpt.py", "from nanochat.serve import app as _planted", "nanochat layers"),
    ("tools/calculator.py", "import nanochat.inference.engine as _planted", "nanochat layers"),
    ("data/loader.py", "from nanochat.evals import report as _planted", "nanochat layers"),
])
def test_a_planted_wrong_way_import_breaks_the_layers(tmp_path, module, line, contract):
    """The contract is live: one wrong-way import (a lower layer reaching up) makes lint-imports fail and name it."""
    root = copy_packages(tmp_path)
    plant(root / "nanochat" / module, line)
    done = lint_imports(python_path=root)
    assert done.returncode != 0
    assert f"{contract} BROKEN" in done.stdout
    importer = "nanochat." + module.removesuffix(".py").replace("/", ".")
    assert importer in done.stdout


def test_a_planted_kernels_import_of_nanochat_is_refused(tmp_path):
    root = copy_packages(tmp_path)
    plant(root / "nanochat_kernels" / "reference.py", "import nanochat.common as _planted")
    done = lint_imports(python_path=root)
    assert done.returncode != 0 and "the kernels never import nanochat BROKEN" in done.stdout


def test_no_import_circle():
    assert import_cycles("nanochat", "nanochat_kernels") == []


def test_the_circle_check_finds_a_planted_circle(tmp_path):
    """The check above can fail: a function-level import that closes a circle is found."""
    root = copy_packages(tmp_path)
    plant(root / "nanochat" / "tools" / "calculator.py",
          "def _planted():\n    from nanochat.tools import sandbox  # noqa: F401\n")
    plant(root / "nanochat" / "tools" / "sandbox.py", "from nanochat.tools import calculator as _planted")
    cycles = import_cycles("nanochat", python_path=root)
    assert ["nanochat.tools.calculator", "nanochat.tools.sandbox"] in cycles


def function_level_imports(root: Path):
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))

        def walk(node, inside):
            for child in ast.iter_child_nodes(node):
                now = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if now and isinstance(child, (ast.Import, ast.ImportFrom)):
                    yield path, child, lines[child.lineno - 1]
                yield from walk(child, now)

        yield from walk(tree, False)


def test_function_level_imports_are_for_optional_or_heavy_dependencies_and_say_why():
    """Inside a function: never a module of this project (except the command dispatcher's deliberate late import,
    which keeps `nanochat --help` from importing torch); a third-party import carries a reason on its line or on the
    first line of its group."""
    problems = []
    for root in (PACKAGE, KERNELS):
        previous = None
        for path, node, line in function_level_imports(root):
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            relative = node.level if isinstance(node, ast.ImportFrom) else 0
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
            ours = relative == 0 and (module or "").split(".")[0] in ("nanochat", "nanochat_kernels")
            if ours and not (path.name == "cli.py" and path.parent == PACKAGE):
                problems.append(f"{where}: project import inside a function: {line.strip()}")
            same_group = previous is not None and previous[0] == path and previous[1] == node.lineno - 1
            if "#" not in line and not (same_group and previous[2]):
                problems.append(f"{where}: function-level import without a reason: {line.strip()}")
            previous = (path, node.end_lineno, "#" in line or (same_group and previous[2]))
    assert not problems, "\n".join(problems)


def test_ruff_pyflakes_and_import_order():
    done = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "--select", "F,I", str(PACKAGE), str(KERNELS),
                           str(REPO_ROOT / "tests"), str(REPO_ROOT / "bench")],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def readme_tree() -> tuple[set[str], dict[str, str]]:
    """The python/nanochat part of the README's file tree: the paths it lists (folders end in /) and each folder's
    description."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    python/nanochat/ "))
    listed: set[str] = set()
    described: dict[str, str] = {}
    stack: list[str] = []
    last = None
    for line in lines[start + 1:]:
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent <= 4:
            break
        if indent >= 33:  # a description's continuation
            if last is not None and last.endswith("/"):
                described[last] += " " + line.strip()
            continue
        depth = (indent - 6) // 2
        stack = stack[:depth]
        first, _, description = line.strip().partition("  ")
        names = [n.strip() for n in first.split(",")]
        prefix = "".join(stack)
        for name in names:
            listed.add(prefix + name)
        last = prefix + names[0]
        if last.endswith("/"):
            described[last] = description
            stack.append(names[0])
    return listed, described


def test_the_readme_tree_matches_the_package():
    """Every module of the package is in the README's tree (as an entry, or named in its folder's description), and
    everything the tree lists exists."""
    listed, described = readme_tree()
    missing = []
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix not in (".py", ".html") or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(PACKAGE).as_posix()
        folder = rel.rpartition("/")[0] + "/" if "/" in rel else ""
        if rel in listed or (path.name == "__init__.py"):
            continue
        if folder in described and path.stem in described[folder]:
            continue
        missing.append(rel)
    assert not missing, f"modules missing from README's tree: {missing}"
    stale = [p for p in listed if not (PACKAGE / p.rstrip("/")).exists()]
    assert not stale, f"README's tree lists what does not exist: {stale}"
    assert {"serve/", "model/", "training/", "inference/"} <= listed

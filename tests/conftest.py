"""Shared pytest set-up: offline hub, an isolated NANOCHAT_BASE_DIR per test, the shared data folder, the tiny
tokenizer, GPU skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def neutral_cwd(tmp_path_factory):
    """Tests, and the subprocesses they start, run from an empty folder rather than the repository root: a Python
    started at the root puts the root on sys.path, where a top-level folder could shadow an installed package. The
    few that need the root (the recipes in runs/) pass cwd=REPO_ROOT themselves."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real text for tests); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def base_dir(tmp_path, monkeypatch) -> Path:
    """A fresh NANOCHAT_BASE_DIR for the test."""
    path = tmp_path / "nanochat_base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def tok():
    """The small real-text tokenizer of nanochat.model.tiny (vocab 512), trained once per run: tests only read it."""
    from nanochat.model.tiny import tiny_tokenizer

    return tiny_tokenizer(512)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and far more steadily on a shared machine (modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def loopback_listener():
    """A TCP socket listening on 127.0.0.1 (any free port), accept() timing out after 0.3 s: sandbox tests check
    that no connection from the sandboxed program ever reaches it."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.3)
    try:
        yield server
    finally:
        server.close()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

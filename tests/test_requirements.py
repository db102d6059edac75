"""pyproject's dependency lower bounds are the real ones: each torch feature the code uses that arrived in a known
release raises the bound (checked by scanning the sources, so a new use of a newer feature fails here)."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# source text -> the first torch release that has it
TORCH_FEATURES = {
    "enable_gqa=": (2, 5),  # F.scaled_dot_product_attention(..., enable_gqa=) (PyTorch 2.5.0)
    "torch.OutOfMemoryError": (2, 5),  # the top-level alias of torch.cuda.OutOfMemoryError (PyTorch 2.5.0)
    "torch.library.custom_op": (2, 4),  # custom ops with register_fake / register_autograd (PyTorch 2.4.0)
}


def torch_lower_bound(pyproject: Path = REPO_ROOT / "pyproject.toml") -> tuple[int, ...]:
    text = pyproject.read_text()
    match = re.search(r'"torch>=([0-9.]+)"', text)
    assert match, "pyproject.toml must pin a torch lower bound"
    return tuple(int(x) for x in match.group(1).split("."))


def test_torch_lower_bound_covers_the_features_used():
    sources = [p for folder in ("python", "kernels") for p in (REPO_ROOT / folder).rglob("*.py")]
    needed = {}
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for feature, version in TORCH_FEATURES.items():
            if feature in text:
                needed.setdefault(feature, (version, path.relative_to(REPO_ROOT)))
    assert "enable_gqa=" in needed  # the scan sees the code (kernels/nanochat_kernels/reference.py)
    bound = torch_lower_bound()
    for feature, (version, where) in needed.items():
        assert bound >= version, f"{where} uses {feature} (torch {version}), but pyproject allows torch {bound}"


def test_both_packages_state_the_same_torch_floor():
    """nanochat_kernels is installed on its own too: its pyproject carries the same real lower bound."""
    assert torch_lower_bound(REPO_ROOT / "kernels" / "pyproject.toml") == torch_lower_bound()

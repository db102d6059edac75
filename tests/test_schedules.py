"""Learning-rate and momentum schedules: shape, endpoints, monotonicity and input checks."""

from __future__ import annotations

import pytest

from nanochat.model.schedules import lr_multiplier, muon_momentum


def test_constant_then_warmdown():
    n = 100
    lrs = [lr_multiplier(s, n, warmup_ratio=0.0, warmdown_ratio=0.2) for s in range(n + 1)]
    assert lrs[:80] == [1.0] * 80
    assert lrs[80] == pytest.approx(1.0)
    assert lrs[90] == pytest.approx(0.5)
    assert lrs[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_warmup_is_linear_and_never_zero():
    lrs = [lr_multiplier(s, 100, warmup_ratio=0.1, warmdown_ratio=0.0) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10:] == [1.0] * 90


def test_final_lr_fraction():
    assert lr_multiplier(100, 100, warmdown_ratio=0.5, final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(75, 100, warmdown_ratio=0.5, final_lr_frac=0.1) == pytest.approx(0.55)


def test_whole_run_warmdown_and_single_step():
    assert lr_multiplier(0, 10, warmdown_ratio=1.0) == pytest.approx(1.0)
    assert lr_multiplier(5, 10, warmdown_ratio=1.0) == pytest.approx(0.5)
    assert lr_multiplier(0, 1, warmdown_ratio=0.2) == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(step=0, num_iterations=0), "num_iterations"),
    (dict(step=-1, num_iterations=10), "step"),
    (dict(step=0, num_iterations=10, warmup_ratio=0.6, warmdown_ratio=0.6), "sum to at most 1"),
    (dict(step=0, num_iterations=10, warmdown_ratio=-0.1), "warmdown_ratio"),
    (dict(step=0, num_iterations=10, final_lr_frac=2.0), "final_lr_frac"),
])
def test_lr_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_multiplier(**kwargs)


def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)
    assert muon_momentum(5, warmup_steps=0) == 0.95
    with pytest.raises(ValueError, match="step"):
        muon_momentum(-1)

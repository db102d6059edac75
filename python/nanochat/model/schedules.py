"""Learning-rate and momentum schedules as pure functions of the step (the training loop multiplies each group's
initial lr by `lr_multiplier` and sets Muon's momentum to `muon_momentum`).

- lr: linear warmup over warmup_ratio x iterations, constant, then linear warmdown over the last warmdown_ratio x
  iterations to final_lr_frac (nanochat's trapezoid; warmup 0 and warmdown 0.2 by default)
- Muon momentum: linear from 0.85 to 0.95 over the first 300 steps
"""

from __future__ import annotations


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """Multiplier of the initial lr at `step` (0-based) of a run of `num_iterations` optimizer steps."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not (0.0 <= warmup_ratio <= 1.0 and 0.0 <= warmdown_ratio <= 1.0 and warmup_ratio + warmdown_ratio <= 1.0):
        raise ValueError(f"warmup_ratio and warmdown_ratio must lie in [0, 1] and sum to at most 1, "
                         f"got {warmup_ratio} and {warmdown_ratio}")
    if not 0.0 <= final_lr_frac <= 1.0:
        raise ValueError(f"final_lr_frac must lie in [0, 1], got {final_lr_frac}")
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_iterations - warmdown:
        return 1.0
    progress = max(0.0, (num_iterations - step) / warmdown)  # 1 at the start of the warmdown, 0 at the end
    return final_lr_frac + (1.0 - final_lr_frac) * progress


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon's momentum at `step`: linear from `start` to `end` over `warmup_steps`, then constant."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end

"""The noisy-neighbour bench's bootstrap interval of its p99 ratio (bench.noisy.ratio_interval)."""

import math
import random

from bench.noisy import Run, ratio_interval


def _windows(scale: float, seed: int) -> list[Run]:
    rng = random.Random(seed)
    return [
        Run(f"w{i}", [scale * rng.lognormvariate(3, 0.2) for _ in range(600)], 600)
        for i in range(3)
    ]


def test_the_interval_holds_the_ratio_it_was_drawn_from() -> None:
    same_low, same_high = ratio_interval(_windows(1.0, 1), _windows(1.0, 2))
    assert same_low < 1.0 < same_high
    slow_low, slow_high = ratio_interval(_windows(1.0, 1), _windows(1.5, 2))
    assert 1.0 < slow_low < 1.5 < slow_high < 2.0


def test_no_samples_no_interval() -> None:
    low, high = ratio_interval([Run("s", [], 0)], _windows(1.0, 1))
    assert math.isnan(low) and math.isnan(high)

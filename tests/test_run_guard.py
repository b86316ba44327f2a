"""The divergence guard's rules on their own: non-finite values stop, fp16 overflows get the loss
scaler's patience, loss spikes warn. (The whole path, through `vlmtune train`, is in test_faults.py.)"""

from __future__ import annotations

import math

import pytest

from vlmtune.errors import Diverged
from vlmtune.run_guard import DivergenceGuard


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops(value):
    with pytest.raises(Diverged, match=f"at step 7: the loss is {value}"):
        DivergenceGuard(None, fp16_scaling=False).loss(value, 7)


def test_a_non_finite_gradient_norm_stops_at_once_without_fp16_scaling():
    guard = DivergenceGuard(None, fp16_scaling=False)
    guard.grad_norm(3.0, 1)
    with pytest.raises(Diverged, match="at step 2: the gradient norm is inf"):
        guard.grad_norm(math.inf, 2)


def test_fp16_overflows_are_the_scalers_until_they_last_too_long():
    guard = DivergenceGuard(None, fp16_scaling=True, fp16_patience=3)
    for step in range(1, 4):  # the scaler skips these steps and lowers its scale
        guard.grad_norm(math.inf, step)
    guard.grad_norm(1.5, 4)  # a finite step resets the count
    for step in range(5, 8):
        guard.grad_norm(math.nan, step)
    with pytest.raises(Diverged, match="for 4 steps in a row, after fp16 loss scaling backed off"):
        guard.grad_norm(math.nan, 8)


def test_a_loss_spike_warns_and_training_goes_on():
    warnings = []
    guard = DivergenceGuard(3.0, fp16_scaling=False, log=warnings.append)
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.05, 5.9], start=1):
        guard.loss(loss, step)
    assert warnings == []  # 5.9 < 3 x median 2.0
    guard.loss(6.5, 7)
    assert len(warnings) == 1
    assert "step 7: loss 6.5 is 3.2x the median of the last 6" in warnings[0]
    assert "train.max_loss_spike=3.0" in warnings[0]
    assert DivergenceGuard(None, fp16_scaling=False, log=warnings.append).loss(1e9, 1) is None  # off by default

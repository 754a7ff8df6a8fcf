"""Learning-rate schedules and the run length they are computed from."""

from __future__ import annotations

import math

import pytest

from pandallm.optim.schedules import Schedule, total_optimizer_steps, warmup_steps


def test_linear_warmup_then_decay() -> None:
    s = Schedule("linear", total_steps=110, warmup_steps=10)
    assert [s(step) for step in (0, 4, 9)] == pytest.approx([1 / 11, 5 / 11, 10 / 11])
    assert [s(step) for step in (10, 60, 110, 200)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_cosine_poly_warmup_constant() -> None:
    cosine = Schedule("cosine", total_steps=100, warmup_steps=0, min_ratio=0.1)
    assert [cosine(0), cosine(50), cosine(100)] == pytest.approx([1.0, 0.55, 0.1])
    poly = Schedule("poly", total_steps=100, power=2.0)
    assert poly(50) == pytest.approx(0.25)
    assert Schedule("warmup", total_steps=100, warmup_steps=4)(50) == 1.0
    assert Schedule("constant", total_steps=100, warmup_steps=4)(0) == 1.0


def test_warmup_proportion_replaces_steps() -> None:
    assert warmup_steps(1000, 50, None) == 50
    assert warmup_steps(1000, 50, 0.03) == 30
    with pytest.raises(ValueError, match="warmup_proportion"):
        warmup_steps(1000, 50, 1.5)


def test_total_steps_from_the_data() -> None:
    # 10 batches, accumulating 4: steps after batches 4, 8 and the epoch's last (10).
    assert total_optimizer_steps(10, 4, max_epochs=3, max_steps=-1) == 9
    assert total_optimizer_steps(10, 4, max_epochs=3, max_steps=5) == 5
    assert total_optimizer_steps(10, 1, max_epochs=None, max_steps=7) == 7
    with pytest.raises(ValueError, match="max_epochs or trainer.max_steps"):
        total_optimizer_steps(10, 1, max_epochs=-1, max_steps=-1)


def test_schedules_resume_from_the_step_alone() -> None:
    s = Schedule("cosine", total_steps=100, warmup_steps=10)
    assert s(37) == Schedule("cosine", total_steps=100, warmup_steps=10)(37)
    assert not math.isnan(s(1000))

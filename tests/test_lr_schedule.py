"""The learning rate of a step: warm-up, then constant or cosine."""

import pytest

from eflow.train.lr_schedule import learning_rate


def test_linear_warmup_reaches_the_peak_at_the_last_warmup_step():
    assert [learning_rate(s, 100, 1.0, warmup=4) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1, 1])


def test_constant_after_warmup_and_without():
    assert learning_rate(99, 100, 0.3) == 0.3
    assert learning_rate(50, 100, 0.3, warmup=10) == 0.3


def test_cosine_falls_from_peak_to_min_ratio_over_the_post_warmup_steps():
    lr = lambda s: learning_rate(s, 110, 2.0, warmup=10, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert lr(10) == pytest.approx(2.0)
    assert lr(60) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr(110) == pytest.approx(0.2)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="constant or cosine"):
        learning_rate(5, 10, 1.0, schedule="linear")

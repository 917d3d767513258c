"""Issue 35: a learning rate above 1 (1e6 typed for 1e-6) is refused as a likely typo, unless insisted on."""

from __future__ import annotations

import pytest

from dpokit.config import build_config
from dpokit.errors import DpokitError


def _config(**train):
    return build_config({"model": {"model": "m"}, "data": {"data": "d"}, "train": {"output": "o", **train}})


@pytest.mark.parametrize(("rate", "guess"), [(1e6, "1e-06"), (3e4, "3e-04"), (2.5e1, "2.5e-01")])
def test_a_rate_above_one_is_refused_with_the_likely_typo(rate, guess):
    with pytest.raises(DpokitError, match=f"did you mean {guess}\\?.*--allow-large-learning-rate"):
        _config(learning_rate=rate)


def test_insisting_and_rates_up_to_one_pass():
    assert _config(learning_rate=1e6, allow_large_learning_rate=True).train.learning_rate == 1e6
    assert _config(learning_rate=1.0).train.learning_rate == 1.0
    with pytest.raises(DpokitError, match=r"--learning-rate 1.5 is above 1, which wrecks the model in one AdamW "
                                          r"step \(pass"):
        _config(learning_rate=1.5)  # no exponent to flip: no guess

"""The "auto" hyperparameter rules (`adapters.auto_hyperparameters`), and that they learn the shipped sample."""

from __future__ import annotations

import pytest

from adapters.auto_hyperparameters import BASE_LEARNING_RATE, batch_size_for, choose, epochs_for, multiplier_for


@pytest.mark.parametrize("examples, batch", [(1, 1), (15, 1), (20, 2), (96, 8), (1000, 32), (10**6, 32)])
def test_batch_size_is_a_power_of_two_near_a_tenth_of_the_examples(examples, batch):
    assert batch_size_for(examples) == batch


@pytest.mark.parametrize("examples, tokens, epochs", [
    (96, 3168, 25),          # the sample: raised until 80,000 supervised tokens are trained on
    (20, 10**6, 5),          # OpenAI: at least 100 examples seen
    (5000, 10**6, 3),        # OpenAI's default
    (20000, 10**7, 1),       # OpenAI: at most 25,000 examples seen
    (10, 10, 25),            # never more than 25
])
def test_epochs_follow_openai_then_the_supervised_token_count(examples, tokens, epochs):
    assert epochs_for(examples, tokens) == epochs


def test_the_learning_rate_is_inverse_to_width_and_given_values_are_kept():
    assert multiplier_for(4096) == 1 and multiplier_for(128) == 16 and multiplier_for(64) == 16
    assert multiplier_for(8192) == 0.5 and multiplier_for(None) == 1
    chosen = choose(96, 3168, 128, batch_size=4)
    assert (chosen.n_epochs, chosen.batch_size, chosen.learning_rate) == (25, 4, 16 * BASE_LEARNING_RATE)

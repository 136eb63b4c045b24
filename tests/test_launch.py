"""The driver's retry loop around Ray Train's fit()."""

import itertools

from raycpt.launch import controller_attempts


def test_max_failures_minus_one_retries_without_end():
    # -1 is "unlimited" (as Ray's FailureConfig reads it): the first fit and then retries for ever.
    assert list(itertools.islice(controller_attempts(-1), 1000)) == list(range(1000))


def test_max_failures_n_allows_n_retries_after_the_first_fit():
    assert list(controller_attempts(0)) == [0]
    assert list(controller_attempts(3)) == [0, 1, 2, 3]

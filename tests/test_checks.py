"""The shared argument checks: what counts as an integer and a number, and the error a bad count gets."""

from __future__ import annotations

import numpy as np
import pytest

from agw_light.checks import is_integer, is_number, positive_int


def test_integers_include_numpy_and_exclude_flags_and_floats():
    assert [is_integer(v) for v in (3, np.int64(3), 0, -2)] == [True, True, True, True]
    assert [is_integer(v) for v in (True, np.bool_(True), 3.0, "3", None)] == [False] * 5


def test_numbers_include_floats_and_exclude_flags_and_text():
    assert [is_number(v) for v in (3, 2.5, np.float32(2.5), np.int8(1), float("nan"))] == [True] * 5
    assert [is_number(v) for v in (False, "1", None, 1j)] == [False] * 4


@pytest.mark.parametrize("value", [0, -1, 1.0, True, "2"])
def test_positive_int_names_the_bad_value(value):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {value!r}"):
        positive_int(value, "batch_size")


def test_positive_int_returns_a_python_int():
    value = positive_int(np.int32(7), "k")
    assert value == 7 and type(value) is int

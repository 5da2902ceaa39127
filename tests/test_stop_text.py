"""Hold-back of text that may start a stop sequence (checked by hand)."""

import pytest

from server.engine_loop import _held_back


@pytest.mark.parametrize("text,stops,expected", [
    ("hello", ("world",), 0),
    ("hello wo", ("world",), 2),  # "wo" may become "world"
    ("hello w", ("world", "xyz"), 1),
    ("abc", ("abcd",), 3),  # all of it may be the start
    ("abcd", ("abcd",), 0),  # a whole match is found by the caller, not held back
    ("ab", ("b", "abc"), 2),  # the longest candidate wins
    ("", ("abc",), 0),
    ("END", ("\nEND",), 0),
    ("x\nEN", ("\nEND",), 3),
])
def test_held_back(text, stops, expected):
    assert _held_back(text, stops) == expected

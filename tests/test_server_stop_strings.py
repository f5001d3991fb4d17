"""Stop strings across token boundaries: never emitted, text before them always emitted."""
from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from server.stop_strings import StopStringMatcher


def _run(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, str | None]:
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        match = matcher.push(piece)
        out.append(match.emit)
        if match.matched is not None:
            return "".join(out), match.matched
    return "".join(out) + matcher.flush(), None


def test_stop_split_over_pieces_is_cut_and_not_emitted() -> None:
    matcher = StopStringMatcher(("END",))
    assert matcher.push("abc E").emit == "abc "     # "E" could start "END": held back
    assert matcher.push("N").emit == ""
    last = matcher.push("Dxyz")
    assert (last.emit, last.matched) == ("", "END")


def test_false_prefix_is_released() -> None:
    matcher = StopStringMatcher(("END",))
    assert matcher.push("EN").emit == ""
    assert matcher.push("x").emit == "ENx"
    assert matcher.flush() == ""


def test_earliest_match_wins_and_held_text_flushes() -> None:
    assert _run(["a", "bXc", "Yd"], ("cY", "bX")) == ("a", "bX")
    assert _run(["hello wor"], ("world",)) == ("hello wor", None)


@given(text=st.text(alphabet="abcE", max_size=40), stop=st.text(alphabet="abcE", min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_matches_plain_find_whatever_the_split(text: str, stop: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    emitted, matched = _run(pieces, (stop,))
    at = text.find(stop)
    if at >= 0:
        assert (emitted, matched) == (text[:at], stop)
    else:
        assert (emitted, matched) == (text, None)

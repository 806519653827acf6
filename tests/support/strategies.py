"""Hypothesis strategies shared by the fuzz and parity tests of the A2A dispatch."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def json_scalars(*, int_bits: int, text: int) -> st.SearchStrategy[Any]:
    """null, booleans, ints within ±2**int_bits, finite floats, strings up to `text` long."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**int_bits), max_value=2**int_bits),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=text),
    )


def json_values(
    scalars: st.SearchStrategy[Any], *, key: int, width: int, leaves: int
) -> st.SearchStrategy[Any]:
    """`scalars` nested in lists and objects (keys up to `key` long), up to `width` wide and
    `leaves` leaves in all."""
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=width),
            st.dictionaries(st.text(max_size=key), inner, max_size=width),
        ),
        max_leaves=leaves,
    )

"""The index member format has one definition (orders.store.views): the writer, the Python parser and
the Lua fragment of the read scripts all follow it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orders.store.views import (
    MEMBER_ORDER_ID_OFFSET,
    MEMBER_TIME_DIGITS,
    index_member,
    member_order_id,
)

ORDER_IDS = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
TIMES = st.integers(0, 10**MEMBER_TIME_DIGITS - 1)


@given(TIMES, ORDER_IDS)
def test_a_written_member_parses_back_to_its_order_id(created_at_us: int, order_id: str) -> None:
    """member_order_id(index_member(t, id)) is id, for every time the member format holds."""
    member = index_member(created_at_us, order_id)

    assert member_order_id(member) == order_id


def test_the_order_id_starts_after_the_padded_time_and_a_colon() -> None:
    """The offset is derived from the time's width: 16 digits, a colon, then the id."""
    member = index_member(42, "o-1")

    assert (MEMBER_TIME_DIGITS, MEMBER_ORDER_ID_OFFSET) == (16, 17)
    assert member[:MEMBER_ORDER_ID_OFFSET] == "0000000000000042:"

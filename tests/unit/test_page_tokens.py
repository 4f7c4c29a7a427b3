"""ListOrders page tokens (read_service.page_tokens): signed cursors that only the service's key makes."""

from __future__ import annotations

import base64
import json
import logging
from typing import cast

import pytest
import redis.exceptions
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from orders.domain.errors import InvalidQuery
from read_service.page_tokens import (
    MAX_TOKEN_CHARACTERS,
    MIN_KEY_CHARACTERS,
    NOT_OURS,
    TAG_BYTES,
    PageCursor,
    PageTokens,
    SharedKeyFollower,
    configured_key,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
CURSOR = PageCursor("cust-1", "PENDING", "0000000000000001:o-1")


def b64(raw: bytes) -> str:
    """A page token's encoding (URL-safe base64 without padding) of arbitrary bytes."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def refusal(tokens: PageTokens, token: str, customer_id: str = "", status: str = "") -> str:
    """The description of the page_token violation that decoding `token` raises."""
    with pytest.raises(InvalidQuery) as caught:
        tokens.decode(token, customer_id, status)
    [violation] = caught.value.violations
    assert violation.field == "page_token"
    return violation.description


@given(st.text(), st.text(), st.text())
def test_a_token_round_trips(customer_id: str, status: str, after: str) -> None:
    """decode(encode(cursor)) with the same filters is the cursor; the token is URL-safe and unpadded."""
    tokens = PageTokens(KEY)
    cursor = PageCursor(customer_id, status, after)

    token = tokens.encode(cursor)

    assert tokens.decode(token, customer_id, status) == cursor
    assert not set(token) & set("+/=")


def test_a_token_of_the_old_unsigned_shape_is_refused() -> None:
    """The JSON cursor alone, as tokens were before they were signed (and as anyone can make), is not ours."""
    hand_made = b64(json.dumps(["cust-1", "PENDING", "0000000000000001:o-1"]).encode())

    assert refusal(PageTokens(KEY), hand_made, "cust-1", "PENDING") == NOT_OURS


def test_a_token_signed_under_another_key_is_refused() -> None:
    """Another deployment's (or a guessed) key makes tokens this one refuses."""
    token = PageTokens(OTHER_KEY).encode(CURSOR)

    assert refusal(PageTokens(KEY), token, "cust-1", "PENDING") == NOT_OURS


@pytest.mark.parametrize("position", [0, 5, -TAG_BYTES - 1, -TAG_BYTES, -1])
def test_a_token_with_any_byte_changed_is_refused(position: int) -> None:
    """Changing one byte of the cursor or of the tag makes the token not ours."""
    tokens = PageTokens(KEY)
    raw = bytearray(unb64(tokens.encode(CURSOR)))
    raw[position] ^= 0x01

    assert refusal(tokens, b64(bytes(raw)), "cust-1", "PENDING") == NOT_OURS


def test_a_cursor_changed_to_other_filters_and_resigned_by_hand_is_refused() -> None:
    """Moving a real token's tag onto a cursor of other filters does not make a token."""
    tokens = PageTokens(KEY)
    tag = unb64(tokens.encode(CURSOR))[-TAG_BYTES:]
    forged = b64(json.dumps(["someone", "PENDING", CURSOR.after], separators=(",", ":")).encode() + tag)

    assert refusal(tokens, forged, "someone", "PENDING") == NOT_OURS


@pytest.mark.parametrize(
    ("customer_id", "status"),
    [("cust-2", "PENDING"), ("cust-1", ""), ("", "PENDING"), ("cust-1", "SHIPPED")],
)
def test_a_real_token_of_other_filters_is_refused(customer_id: str, status: str) -> None:
    """A token is only valid for the filters it was issued for."""
    tokens = PageTokens(KEY)

    assert refusal(tokens, tokens.encode(CURSOR), customer_id, status) == "belongs to a request with other filters"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("!!!", id="not-base64"),
        pytest.param("é", id="non-ascii"),
        pytest.param("a", id="bad-length"),
        pytest.param("====", id="only-padding"),
        pytest.param(b64(b"x" * TAG_BYTES), id="tag-alone"),
        pytest.param(b64(b"not json at all, and long enough"), id="not-json"),
        pytest.param(b64(b"\xff\xfe\x00" * 20), id="not-utf8"),
        pytest.param(b64(b"[" * 1000 + b"]" * 1000), id="deep-json"),
        pytest.param("A" * (MAX_TOKEN_CHARACTERS + 4), id="too-long"),
    ],
)
def test_garbage_is_refused(token: str) -> None:
    """Anything that is not a token this key signed is refused as not ours."""
    assert refusal(PageTokens(KEY), token) == NOT_OURS


def test_tokens_of_the_previous_key_stay_valid_after_a_change_but_not_after_two() -> None:
    """A replica that adopts a new shared key still pages on with the tokens it signed just before."""
    tokens = PageTokens(KEY)
    before = tokens.encode(CURSOR)

    tokens.use(OTHER_KEY)
    assert tokens.decode(before, "cust-1", "PENDING") == CURSOR
    assert PageTokens(OTHER_KEY).decode(tokens.encode(CURSOR), "cust-1", "PENDING") == CURSOR

    tokens.use(b"t" * 32)
    assert refusal(tokens, before, "cust-1", "PENDING") == NOT_OURS


def test_two_signers_under_one_key_accept_each_others_tokens() -> None:
    """Replicas share nothing but the key."""
    assert PageTokens(KEY).decode(PageTokens(KEY).encode(CURSOR), "cust-1", "PENDING") == CURSOR


def test_a_process_key_is_its_own() -> None:
    """Two processes without a shared key refuse each other's tokens."""
    token = PageTokens.of_this_process().encode(CURSOR)

    assert refusal(PageTokens.of_this_process(), token, "cust-1", "PENDING") == NOT_OURS


def test_a_configured_key_must_be_long() -> None:
    """ORDERS_PAGE_TOKEN_KEY: empty (use Redis) or at least MIN_KEY_CHARACTERS characters."""
    assert configured_key("") == ""
    assert configured_key("s" * MIN_KEY_CHARACTERS) == "s" * MIN_KEY_CHARACTERS
    with pytest.raises(ValueError, match=f"at least {MIN_KEY_CHARACTERS} characters"):
        configured_key("s" * (MIN_KEY_CHARACTERS - 1))


class ReadOnlyRedis:
    """A Redis without the key whose user may not SET (a read-only ACL user): counts the SETs tried."""

    def __init__(self) -> None:
        self.sets = 0

    async def get(self, name: str) -> str | None:
        return None

    async def set(self, name: str, value: str, nx: bool = False) -> bool:
        self.sets += 1
        raise redis.exceptions.NoPermissionError("NOPERM this user has no permissions to run the 'set' command")


async def test_a_read_only_user_tries_to_create_the_key_once_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """Each refused SET is an ACL LOG entry: after the first, the follower only reads; it warns once."""
    client = ReadOnlyRedis()
    follower = SharedKeyFollower(cast(Redis, client), "orders:page-token-key", PageTokens(KEY))

    with caplog.at_level(logging.WARNING, logger="read_service.page_tokens"):
        results = [await follower.refresh(), await follower.refresh()]

    assert results == [False, False]
    assert client.sets == 1
    assert ["set ORDERS_PAGE_TOKEN_KEY" in record.message for record in caplog.records] == [True]

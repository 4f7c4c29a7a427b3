"""ListOrders page tokens that the read service recognises as its own.

A token is the cursor (JSON of [customer_id, status, last member returned]) followed by a tag, in
unpadded URL-safe base64. The tag is HMAC-SHA256 over the cursor, cut to 16 bytes, under a key
that every read replica shares, so a replica accepts the tokens of any other and refuses any token
made by hand (INVALID_ARGUMENT), however well it imitates the shape.

The key is `ORDERS_PAGE_TOKEN_KEY` when set. Otherwise it lives in Redis under the service's prefix
(`ViewKeys.page_token_key`): the first replica creates a random one (SET NX) and every replica reads
it at start and again every `REFRESH_INTERVAL` seconds, so that replicas agree without configuration,
also after a Redis flush replaced it. A replica accepts tokens under its current key and the one
before, so a key change refuses only tokens issued before the change that came before it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass

import redis.exceptions

from orders.domain.errors import FieldViolation, InvalidQuery
from orders.server.tasks import BackgroundTask
from orders.store.views import REDIS_ERRORS, RedisClient

log = logging.getLogger(__name__)

TAG_BYTES = 16  # 128 bits of HMAC-SHA256: forging a token takes ~2^128 guesses
KEY_BYTES = 32  # of a key made at random (as 64 hex digits)
MIN_KEY_CHARACTERS = 32  # of a configured key
MAX_TOKEN_CHARACTERS = 2048  # a real token is a few hundred characters; longer ones are refused unread
REFRESH_INTERVAL = 30.0  # seconds between reads of the shared key
RETRY_INTERVAL = 1.0  # seconds between reads while Redis does not answer
START_TIMEOUT = 2.0  # seconds the start waits for the shared key before going on with a key of its own
# Bound into every tag, so that a key used for something else one day cannot sign page tokens.
_CONTEXT = b"orders.v1.ListOrders.page_token\x00"
NOT_OURS = "not a token returned by ListOrders"
READ_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, OSError)  # the key could not be read


@dataclass(frozen=True)
class PageCursor:
    """What a page token carries: the filters it belongs to and the last member returned."""

    customer_id: str
    status: str
    after: str


def _refused(description: str = NOT_OURS) -> InvalidQuery:
    return InvalidQuery([FieldViolation("page_token", description)])


def _tag(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _CONTEXT + payload, hashlib.sha256).digest()[:TAG_BYTES]


class PageTokens:
    """Turns cursors into signed page tokens and tokens back into cursors."""

    def __init__(self, key: bytes) -> None:
        self._keys: tuple[bytes, ...] = (key,)  # the current key first, then the one before it

    @classmethod
    def of_this_process(cls) -> PageTokens:
        """Under a random key of this process alone: its tokens are valid nowhere else."""
        return cls(secrets.token_hex(KEY_BYTES).encode())

    def use(self, key: bytes) -> None:
        """Signs with `key` from now on; tokens of the key used until now stay valid."""
        if key != self._keys[0]:
            self._keys = (key, self._keys[0])

    def encode(self, cursor: PageCursor) -> str:
        payload = json.dumps([cursor.customer_id, cursor.status, cursor.after], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(payload + _tag(self._keys[0], payload)).decode().rstrip("=")

    def decode(self, token: str, customer_id: str, status: str) -> PageCursor:
        """The cursor of `token`, or InvalidQuery on page_token: a token this service did not sign
        (made by hand, changed, or signed under a key no longer in use), or one of other filters."""
        payload = self._signed_payload(token)
        try:
            customer, stat, after = json.loads(payload)
        except (ValueError, TypeError):  # signed by us, so only with a leaked key
            raise _refused() from None
        cursor = PageCursor(str(customer), str(stat), str(after))
        if (cursor.customer_id, cursor.status) != (customer_id, status):
            raise _refused("belongs to a request with other filters")
        return cursor

    def _signed_payload(self, token: str) -> bytes:
        if len(token) > MAX_TOKEN_CHARACTERS:
            raise _refused()
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):  # not base64, or not ASCII
            raise _refused() from None
        payload, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
        if len(raw) <= TAG_BYTES or not any(hmac.compare_digest(tag, _tag(key, payload)) for key in self._keys):
            raise _refused()
        return payload


def configured_key(text: str) -> str:
    """The parser of ORDERS_PAGE_TOKEN_KEY: empty (use the key in Redis) or a long enough secret."""
    if text and len(text) < MIN_KEY_CHARACTERS:
        raise ValueError(
            f"expected at least {MIN_KEY_CHARACTERS} characters (e.g. from "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`), or empty for a key kept in Redis"
        )
    return text


async def shared_key(client: RedisClient, name: str, *, create: bool = True) -> str | None:
    """The key at `name` in Redis; when there is none and `create`, a random one stored first (SET NX,
    so that of the replicas that start together, the first one's stays). None when there is none.
    Raises NoPermissionError when this Redis user may not create it (a read-only ACL user)."""
    key = await client.get(name)
    if key is None and create:
        await client.set(name, secrets.token_hex(KEY_BYTES), nx=True)
        key = await client.get(name)
    return None if key is None else str(key)


class SharedKeyFollower:
    """Keeps a PageTokens signing with the key in Redis at `name`, read every REFRESH_INTERVAL."""

    def __init__(self, client: RedisClient, name: str, tokens: PageTokens) -> None:
        self._redis = client
        self._name = name
        self._tokens = tokens
        self._task = BackgroundTask("page-token-key")
        self._answered = False  # whether Redis answered the last read (else: read again soon)
        self._may_create = True  # until Redis refuses this user a SET
        self._warned = False

    async def refresh(self) -> bool:
        """Reads the key once (creating it if missing) and signs with it; False when it could not."""
        try:
            key = await shared_key(self._redis, self._name, create=self._may_create)
        except redis.exceptions.NoPermissionError:
            self._may_create = False  # do not try again: each refused SET is an entry in Redis's ACL LOG
            key = None
        except READ_ERRORS as error:
            log.debug("could not read the page token key %s: %s", self._name, error)
            self._answered = False
            return False
        self._answered = True
        if key is None:
            self._warn_once()
            return False
        self._tokens.use(key.encode())
        return True

    def _warn_once(self) -> None:
        if not self._warned:
            log.warning(
                "no page token key at %s, and this Redis user may not create it: ListOrders page tokens "
                "of this process are refused by every other one; set ORDERS_PAGE_TOKEN_KEY",
                self._name,
            )
            self._warned = True

    def start(self) -> None:
        self._task.start(self._follow)

    async def stop(self) -> None:
        await self._task.stop()

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL if self._answered else RETRY_INTERVAL)
            await self.refresh()


async def page_tokens(client: RedisClient, name: str, configured: str) -> tuple[PageTokens, SharedKeyFollower | None]:
    """The read service's PageTokens: under `configured` if set; else under the key in Redis at
    `name`, with the follower that keeps it current (started here; the caller stops it). A Redis that
    does not answer within START_TIMEOUT delays nothing: the process signs with a key of its own until
    the follower has read the shared one."""
    if configured:
        return PageTokens(configured.encode()), None
    tokens = PageTokens.of_this_process()  # until the follower has read the shared key
    follower = SharedKeyFollower(client, name, tokens)
    try:
        async with asyncio.timeout(START_TIMEOUT):
            await follower.refresh()
    except TimeoutError:
        log.warning("Redis did not give the page token key within %g s; reading it in the background", START_TIMEOUT)
    follower.start()
    return tokens, follower

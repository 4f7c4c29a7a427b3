"""The read views in Redis: key names, the order view's shape and its codecs.

The sync worker writes these and the read service reads them; nothing else
knows the layout. Redis is a cache that can be rebuilt from the event store at
any time, so everything here is derived from events.

Keys, under a configurable prefix (default "orders:") and then a partition's hash tag
{t} = "{projection:partition/partitions}" (`orders:{orders:0/1}:order:42`): every key of one
partition of one projection lands in one Redis Cluster slot, so each batch script and each read
touches one slot. A projection is split into `partitions` partitions by a hash of the order id
(orders.store.partitions); one partition (0/1) is the whole projection. Partition counts differ in the tag,
so a deployment can build a new count beside the one that serves (docs/design.md, "Partitions").
    {p}{t}:order:{order_id}                 the order view, as the read API's serialized orders.v1.Order
                                            (older deployments wrote JSON; both are read, see `OrderView.from_stored`)
    {p}{t}:idx:all                          sorted set of every order (of the partition)
    {p}{t}:idx:customer:{customer_id}       a customer's orders
    {p}{t}:idx:status:{STATUS}              orders in one status
    {p}{t}:idx:customer:{customer_id}:{STATUS}  a customer's orders in one status
    {p}{t}:checkpoint:orders                consistency token of the last applied event (of the whole log:
                                            a partition's checkpoint passes the events of other partitions too)
    {p}{t}:rebuild:orders                   while replaying from scratch: the token to reach
    {p}{t}:lease:orders                     id of the one worker allowed to apply (expires)
    {p}{t}:heartbeat:orders                 that worker's last sign of life and status, JSON
    {p}{t}:applied:orders                   events applied in total (exactly-once audit)
    {p}{t}:paused:orders                    present while an operator has paused the partition
    {p}{t}:rebuild-started:orders           when the current rebuild started (Redis clock, ms)
    {p}{t}:parked:orders, {p}{t}:parked:orders:{id}  dead-letter: orders parked on a poison event, and
    {p}{t}:parked-errors:orders             their events' positions and errors
    {p}{t}:parked-mark:orders:{id}          a string beside each parked order's list, so that one MGET sees it
    {p}{t}:generation:orders                the generation readers use (absent = 0), see below
    {p}{t}:next-generation:orders           while a zero-downtime rebuild runs: the generation it builds
    {p}{t}:retired:orders                   after a switch: set of old generations whose keys are being deleted
    {p}workers:orders:{partitions}          the workers sharing the partitions: id -> expiry (sync_worker.membership)
    {p}page-token-key                       the read service's page token key, when not configured
The customer summary projection keeps its own keys, checkpoint, lease and heartbeat:
    {p}{t}:summary:customer:{customer_id}   a customer's summary, JSON (of the partition's orders: a read
                                            adds up the partitions' summaries)
    {p}{t}:summary:order:{order_id}         the projection's own copy of each order's view
    {p}{t}:checkpoint:customer_summary, {p}{t}:lease:customer_summary, ...
Generations: a zero-downtime rebuild writes generation n+1 of a partition while generation n
serves. Generation 0 has the names above; generation n > 0 puts `g{n}:` after the tag in every
view key, the checkpoint, the rebuild mark, `applied` and the parked keys (`{p}{t}:g1:order:{id}`,
`{p}{t}:g1:checkpoint:orders`). Lease, heartbeat, paused, the pointers and the channels have no generation.
Channels (per partition):
    {p}{t}:checkpoint:orders                the new checkpoint, published with every batch
    {p}{t}:changes:orders                   the orders a batch changed, published with it:
                                            JSON [{"order_id", "customer_id", "version"}, ...]

Index members all have score 0 and sort lexicographically as
`{created_at in µs, 16 digits}:{order_id}`: newest first is a reverse range,
and a member is an exact, stable cursor for paging, also across partitions (a merge of their
pages by member is a page of them all). `index_member` writes one and `member_order_id` reads the
order id back: both follow MEMBER_TIME_DIGITS.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.client import NEVER_DECODE
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from orders.config import cluster_startup_urls, is_cluster_url
from orders.domain.events import Address
from orders.domain.status import OrderStatus
from orders.store.partitions import Partition, partition_of
from orders.v1 import types_pb2

PROJECTION = "orders"
SUMMARY_PROJECTION = "customer_summary"
PROJECTIONS = (PROJECTION, SUMMARY_PROJECTION)

# --- index members: the one definition of their format (see the module docstring)
MEMBER_TIME_DIGITS = 16  # creation time in µs, zero-padded: text order is time order until the year 2286
MEMBER_ORDER_ID_OFFSET = MEMBER_TIME_DIGITS + 1  # where the order id starts: after the time and a colon


def index_member(created_at_us: int, order_id: str) -> str:
    """The index member of an order: its creation time, padded so that members sort by it, then its id."""
    return f"{created_at_us:0{MEMBER_TIME_DIGITS}d}:{order_id}"


def member_order_id(member: str) -> str:
    """The order id of an index member (the inverse of `index_member` for the id)."""
    return member[MEMBER_ORDER_ID_OFFSET:]


@dataclass(frozen=True)
class ViewLine:
    sku: str
    name: str
    quantity: int
    unit_price_minor: int


@dataclass(frozen=True)
class OrderView:
    order_id: str
    customer_id: str
    currency_code: str
    status: str
    created_at_us: int
    updated_at_us: int
    version: int
    lines: tuple[ViewLine, ...] = ()
    shipping_address: Address | None = None
    carrier: str = ""
    tracking_number: str = ""
    cancellation_reason: str = ""

    @property
    def total_minor(self) -> int:
        return sum(line.quantity * line.unit_price_minor for line in self.lines)

    def index_member(self) -> str:
        return index_member(self.created_at_us, self.order_id)

    def to_message(self) -> types_pb2.Order:
        """The view as the read API serves it (line totals and the order total computed here)."""
        currency, total = self.currency_code, 0
        order = types_pb2.Order(
            order_id=self.order_id,
            customer_id=self.customer_id,
            status=_WIRE_STATUS[self.status],
            version=self.version,
            carrier=self.carrier,
            tracking_number=self.tracking_number,
            cancellation_reason=self.cancellation_reason,
        )
        # Nested messages set in place, not built and copied in: the worker encodes one view per
        # changed order and batch, and building LineItems with their Money took half of it.
        items = order.items
        for line in self.lines:
            price, quantity = line.unit_price_minor, line.quantity
            total += price * quantity
            item = items.add(sku=line.sku, name=line.name, quantity=quantity)
            unit_price, line_total = item.unit_price, item.line_total
            unit_price.currency_code, unit_price.minor_units = currency, price
            line_total.currency_code, line_total.minor_units = currency, price * quantity
        order.total.currency_code, order.total.minor_units = currency, total
        _set_timestamp(order.created_at, self.created_at_us)
        _set_timestamp(order.updated_at, self.updated_at_us)
        if (address := self.shipping_address) is not None:
            wire = order.shipping_address
            wire.recipient, wire.line1, wire.line2 = address.recipient, address.line1, address.line2
            wire.city, wire.region, wire.postal_code = address.city, address.region, address.postal_code
            wire.country_code = address.country_code
        return order

    def to_wire(self) -> bytes:
        """The stored form: the serialized orders.v1.Order that GetOrder returns as it is. Raises
        ValueError for a field out of the message's range (a quantity beyond int32; the domain's
        rules keep them far inside)."""
        return self.to_message().SerializeToString()

    @classmethod
    def from_message(cls, order: types_pb2.Order) -> OrderView:
        """The view of an orders.v1.Order (its currency is the total's: set even for an order without lines)."""
        address = order.shipping_address if order.HasField("shipping_address") else None
        return cls(
            order.order_id,
            order.customer_id,
            order.total.currency_code,
            _VIEW_STATUS[order.status],
            _micros(order.created_at),
            _micros(order.updated_at),
            order.version,
            tuple([ViewLine(item.sku, item.name, item.quantity, item.unit_price.minor_units) for item in order.items]),
            None
            if address is None
            else Address(
                address.recipient,
                address.line1,
                address.city,
                address.postal_code,
                address.country_code,
                address.line2,
                address.region,
            ),
            order.carrier,
            order.tracking_number,
            order.cancellation_reason,
        )

    @classmethod
    def from_wire(cls, raw: bytes) -> OrderView:
        return cls.from_message(types_pb2.Order.FromString(raw))

    @classmethod
    def from_stored(cls, raw: str | bytes) -> OrderView:
        """A view as stored, in either form: the wire form, or the JSON that deployments before it wrote."""
        if is_json_view(raw):
            return cls.from_json(raw)
        return cls.from_wire(raw if isinstance(raw, bytes) else raw.encode())

    def to_json(self) -> str:
        # orjson: several times faster than json on the worker's and the read service's hot paths;
        # every integer of an order view is bounded well inside its 64-bit range (orders.domain.rules).
        return orjson.dumps(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> OrderView:
        data: dict[str, Any] = orjson.loads(text)
        address = data.pop("shipping_address")
        lines = tuple(ViewLine(**line) for line in data.pop("lines"))
        view = cls(**data, lines=lines)
        return view if address is None else replace(view, shipping_address=Address(**address))


# The order status in the view (OrderStatus) and on the wire (orders.v1.OrderStatus): same names.
_WIRE_STATUS: dict[str, types_pb2.OrderStatus.ValueType] = {
    status: types_pb2.OrderStatus.Value(f"ORDER_STATUS_{status}") for status in OrderStatus
}
_VIEW_STATUS = {number: OrderStatus(status) for status, number in _WIRE_STATUS.items()}


def _set_timestamp(timestamp: Timestamp, micros: int) -> None:
    timestamp.seconds, timestamp.nanos = micros // 1_000_000, (micros % 1_000_000) * 1000


def _micros(timestamp: Timestamp) -> int:
    return timestamp.seconds * 1_000_000 + timestamp.nanos // 1000


def is_json_view(raw: str | bytes) -> bool:
    """Whether a stored order view is in the old JSON form. JSON views start with '{' (0x7B); a
    serialized Order starts with a field tag, and 0x7B would be field 15 with wire type 3 (a
    deprecated group start) that the Order message never has: the two forms cannot be mistaken."""
    return raw[:1] in (b"{", "{")


def add_count(counts: dict[str, int], key: str, amount: int) -> None:
    """Adds `amount` to `counts[key]` in place; a count that reaches 0 goes: a customer summary's
    counts and spend (by status, by currency) never hold zeros."""
    total = counts.get(key, 0) + amount
    if total:
        counts[key] = total
    else:
        counts.pop(key, None)


@dataclass(frozen=True)
class CustomerSummaryView:
    customer_id: str
    order_count: int = 0
    by_status: dict[str, int] = field(default_factory=dict)  # current status -> orders
    spend_minor: dict[str, int] = field(default_factory=dict)  # currency -> total of spending orders
    first_order_us: int = 0
    last_order_us: int = 0

    def to_json(self) -> str:
        # json, not orjson: lifetime spend is a sum without bound, and orjson stops at 64 bits. The
        # fields by hand, not dataclasses.asdict (which deep-copies them): a quarter of the cost.
        fields = {
            "customer_id": self.customer_id,
            "order_count": self.order_count,
            "by_status": self.by_status,
            "spend_minor": self.spend_minor,
            "first_order_us": self.first_order_us,
            "last_order_us": self.last_order_us,
        }
        return json.dumps(fields, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CustomerSummaryView:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ViewKeys:
    """Names of every key and channel of one partition of one projection, under one prefix (tests
    use a prefix each)."""

    prefix: str = "orders:"
    projection: str = field(default=PROJECTION)
    generation: int = 0
    partition: int = 0
    partitions: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.partition < self.partitions:
            raise ValueError(f"partition {self.partition} of {self.partitions}")

    @property
    def tag(self) -> str:
        """The partition's hash tag: Redis Cluster hashes only what is inside the braces."""
        return f"{{{self.projection}:{self.partition}/{self.partitions}}}"

    @property
    def pprefix(self) -> str:
        """The prefix of this partition's keys and channels (every generation)."""
        return f"{self.prefix}{self.tag}:"

    @property
    def gprefix(self) -> str:
        """The prefix of this generation's keys."""
        return generation_prefix(self.pprefix, self.generation)

    @property
    def name(self) -> str:
        """The partition's name in logs, metrics and the admin API: the projection, and its partition
        when there are several (`orders`, `orders/2`)."""
        return self.projection if self.partitions == 1 else f"{self.projection}/{self.partition}"

    def at(self, generation: int) -> ViewKeys:
        """The keys of another generation of this partition."""
        return replace(self, generation=generation)

    def of(self, projection: str) -> ViewKeys:
        """The keys of another projection's same partition under the same prefix (generation 0)."""
        return ViewKeys(self.prefix, projection, 0, self.partition, self.partitions)

    def all_partitions(self) -> list[ViewKeys]:
        """The keys of every partition of this projection (generation 0), in partition order."""
        return [ViewKeys(self.prefix, self.projection, 0, k, self.partitions) for k in range(self.partitions)]

    def for_order(self, order_id: str) -> ViewKeys:
        """The keys of the partition of this projection that holds `order_id` (generation 0)."""
        return ViewKeys(self.prefix, self.projection, 0, partition_of(order_id, self.partitions), self.partitions)

    @property
    def log_partition(self) -> Partition:
        """Which orders' events this partition reads from the log."""
        return Partition(self.partition, self.partitions)

    def owns(self, order_id: str) -> bool:
        """Whether this partition holds `order_id`'s views (and applies its events)."""
        return self.partitions == 1 or partition_of(order_id, self.partitions) == self.partition

    def order(self, order_id: str) -> str:
        return f"{self.gprefix}order:{order_id}"

    def index(self, customer_id: str = "", status: str = "") -> str:
        """The index holding exactly the orders matching both filters (empty = any)."""
        if customer_id and status:
            return f"{self.gprefix}idx:customer:{customer_id}:{status}"
        if customer_id:
            return f"{self.gprefix}idx:customer:{customer_id}"
        if status:
            return f"{self.gprefix}idx:status:{status}"
        return f"{self.gprefix}idx:all"

    def indexes_of(self, view: OrderView) -> list[str]:
        """Every index that lists `view` in its current status."""
        customer, status = view.customer_id, view.status
        return [self.index(), self.index(customer), self.index("", status), self.index(customer, status)]

    def summary_customer(self, customer_id: str) -> str:
        return f"{self.gprefix}summary:customer:{customer_id}"

    def summary_order(self, order_id: str) -> str:
        return f"{self.gprefix}summary:order:{order_id}"

    @property
    def generation_pointer(self) -> str:
        """The generation that readers use and live batches go to; absent means 0."""
        return f"{self.pprefix}generation:{self.projection}"

    @property
    def next_generation(self) -> str:
        """While a zero-downtime rebuild runs: the generation being built."""
        return f"{self.pprefix}next-generation:{self.projection}"

    @property
    def retired(self) -> str:
        """After a switch: set of old generations whose keys the worker deletes in chunks."""
        return f"{self.pprefix}retired:{self.projection}"

    @property
    def checkpoint(self) -> str:
        return f"{self.gprefix}checkpoint:{self.projection}"

    @property
    def checkpoint_channel(self) -> str:
        return f"{self.pprefix}checkpoint:{self.projection}"

    @property
    def changes_channel(self) -> str:
        """Where the orders projection announces which orders each batch changed (live watch)."""
        return f"{self.pprefix}changes:{self.projection}"

    @property
    def rebuild_target(self) -> str:
        return f"{self.gprefix}rebuild:{self.projection}"

    @property
    def lease(self) -> str:
        return f"{self.pprefix}lease:{self.projection}"

    @property
    def heartbeat(self) -> str:
        return f"{self.pprefix}heartbeat:{self.projection}"

    @property
    def applied(self) -> str:
        return f"{self.gprefix}applied:{self.projection}"

    @property
    def paused(self) -> str:
        return f"{self.pprefix}paused:{self.projection}"

    @property
    def rebuild_started(self) -> str:
        return f"{self.pprefix}rebuild-started:{self.projection}"

    @property
    def parked(self) -> str:
        """Sorted set of the orders whose events are parked, scored by their first parked position."""
        return f"{self.gprefix}parked:{self.projection}"

    def parked_events(self, order_id: str) -> str:
        """List of the positions of one order's parked events, in log order."""
        return f"{self.gprefix}parked:{self.projection}:{order_id}"

    def parked_mark(self, order_id: str) -> str:
        """A string present while `order_id` has parked events: unlike the list, one MGET with the view
        can read it (GetOrder's one-round-trip read). Written and deleted with the list."""
        return f"{self.gprefix}parked-mark:{self.projection}:{order_id}"

    @property
    def parked_errors(self) -> str:
        """Hash from parked order id to the error that parked it."""
        return f"{self.gprefix}parked-errors:{self.projection}"

    @property
    def page_token_key(self) -> str:
        """The read service's key for signing ListOrders page tokens, when not configured: one per
        prefix (no projection, partition or generation), so rebuilds keep it; a flush replaces it."""
        return f"{self.prefix}page-token-key"

    @property
    def workers(self) -> str:
        """The workers sharing this projection's partitions (of this count), with their expiry times."""
        return f"{self.prefix}workers:{self.projection}:{self.partitions}"

    @property
    def parked_requests(self) -> str:
        """List of operator requests (JSON) for the active worker: retry an order's parked events."""
        return f"{self.pprefix}parked-requests:{self.projection}"

    def view_patterns(self) -> list[str]:
        """SCAN patterns of every view key of this partition's generation (to delete them for a
        rebuild). Braces are not special in SCAN patterns; square brackets are, and a tag has none."""
        parked = [f"{self.gprefix}parked:{self.projection}*", f"{self.gprefix}parked-mark:{self.projection}:*"]
        parked.append(self.parked_errors)
        if self.projection == SUMMARY_PROJECTION:
            return [f"{self.gprefix}summary:*", *parked]
        return [f"{self.gprefix}order:*", f"{self.gprefix}idx:*", *parked]

    @property
    def generation_keys(self) -> list[str]:
        """This generation's single keys outside the view patterns."""
        return [self.checkpoint, self.rebuild_target, self.applied]


def generation_prefix(prefix: str, generation: int) -> str:
    return prefix if generation == 0 else f"{prefix}g{generation}:"


def parse_generation(raw: str | bytes | None) -> int:
    """A generation pointer's value; absent means 0 (also for `next-generation`: none is built)."""
    return 0 if raw is None else int(raw)


# Every script of the read path starts with this check: KEYS[1] is a partition's generation pointer,
# ARGV[1] the generation the caller guessed (the pointer's value it last saw), and every other key
# it declares is named in that generation. When the pointer names another generation the script
# reads nothing and answers GENERATION_MOVED and the live generation; the caller renames its keys
# and runs it again. So every key a script touches is declared (Redis Cluster routes a script by
# its keys: one partition's keys share a hash tag, so one slot), and a reader never mixes
# generations nor reads one that a switch has just retired; in the steady state it is one round trip.
GENERATION_MOVED = "generation moved: "
GENERATION_PREFIX_LUA = f"""
local live = redis.call('GET', KEYS[1]) or '0'
if live ~= ARGV[1] then return '{GENERATION_MOVED}' .. live end
"""
# KEYS[2..]: the keys to read; ARGV[2]: one letter per key, 'g' for its value (GET), 'e' for whether
# it exists ("1" or nil), for keys that are not strings.
_READ_LIVE = (
    GENERATION_PREFIX_LUA
    + """
local result, modes = {}, ARGV[2]
for i = 2, #KEYS do
  if string.sub(modes, i - 1, i - 1) == 'e' then
    result[#result + 1] = redis.call('EXISTS', KEYS[i]) == 1 and '1' or false
  else
    result[#result + 1] = redis.call('GET', KEYS[i])
  end
end
return result
"""
)
MAX_GENERATION_MOVES = 3  # a switch is rare (one per rebuild): more moves in a row than this is a fault


class Exists(str):
    """A key name whose existence `LiveReader.get` asks ("1" or None) instead of its value."""


KeyNames = Callable[[ViewKeys], Sequence[str]]  # a read's keys, named in the generation it is given
Declared = Callable[[ViewKeys], "tuple[list[str], list[Arg]]"]  # a script's keys and arguments, likewise


class GenerationKeepsMoving(RedisError):
    """A partition's generation pointer moved at every try of a read (not seen in practice): a
    RedisError, as the read failed."""


class LiveReader:
    """Reads one partition's keys in its live generation: the keys named in the generation last seen
    live (`generation`), checked against the pointer in the same step (GENERATION_PREFIX_LUA)."""

    def __init__(self, redis: RedisClient, keys: ViewKeys) -> None:
        self._redis = redis
        self.keys = keys.at(0)
        self.generation = 0  # the pointer's value last seen: the guess each read starts from
        self.on_move: Callable[[int], None] = lambda generation: None  # a switch was seen

    @property
    def live(self) -> ViewKeys:
        """The keys of the generation last seen live."""
        return self.keys.at(self.generation)

    def saw(self, generation: int) -> None:
        """Records the pointer's value, seen by a read of this reader or elsewhere (a plain MGET)."""
        if generation != self.generation:
            self.generation = generation
            self.on_move(generation)

    async def get(self, names: KeyNames) -> list[str | None]:
        """The values of the keys `names` gives for the live generation (an `Exists` name: whether it
        exists), read in one atomic step."""
        return list(await self._get(names, raw=False))

    async def get_raw(self, names: KeyNames) -> list[bytes | None]:
        """As `get`, as bytes: order views are binary (a decoding client would fail on them)."""
        return list(await self._get(names, raw=True))

    async def _get(self, names: KeyNames, *, raw: bool) -> Any:
        def declared(keys: ViewKeys) -> tuple[list[str], list[Arg]]:
            wanted = list(names(keys))
            return wanted, ["".join("e" if isinstance(name, Exists) else "g" for name in wanted)]

        return await self.run(_READ_LIVE, declared, raw=raw)

    async def run(self, script: str, declared: Declared, *, raw: bool = False) -> Any:
        """The reply of `script` (which starts with GENERATION_PREFIX_LUA) run on the keys and arguments
        that `declared` gives for the live generation: KEYS = [pointer, *keys], ARGV = [generation,
        *arguments]. Runs it again under the live generation when the guess was wrong."""
        for _ in range(MAX_GENERATION_MOVES + 1):
            keys = self.live
            names, args = declared(keys)
            reply = await run_script(
                self._redis, script, [keys.generation_pointer, *names], [keys.generation, *args], raw=raw
            )
            moved = moved_to(reply)
            if moved is None:
                return reply
            self.saw(moved)
        raise GenerationKeepsMoving(
            f"the generation of {self.keys.name} moved at each of {MAX_GENERATION_MOVES + 1} reads"
        )


def moved_to(reply: Any) -> int | None:
    """The live generation a read script answered instead of reading (GENERATION_MOVED), else None."""
    if isinstance(reply, bytes):
        reply = reply.decode()
    if isinstance(reply, str) and reply.startswith(GENERATION_MOVED):
        return int(reply.removeprefix(GENERATION_MOVED))
    return None


Arg = str | bytes | int | float  # a Redis command's argument
# A client of one Redis or of a Redis Cluster (redis_client): the views' code runs on both, as every
# script and read touches one partition's keys, which share a hash tag and so one slot.
RedisClient = Redis | RedisCluster
# What a failing Redis raises: the cluster client's own errors (no node serves a slot, the cluster
# cannot be reached) are not RedisErrors.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


async def execute(redis: RedisClient, *args: Arg, raw: bool = False) -> Any:
    """A Redis command's reply; with `raw`, its strings stay bytes whatever the client decodes."""
    options: dict[str, list[str]] = {NEVER_DECODE: []} if raw else {}
    return await redis.execute_command(*args, **options)


async def run_script(
    redis: RedisClient, script: str, keys: list[Arg], args: list[Arg], *, raw: bool = False, sha: str | None = None
) -> Any:
    """A Lua script's reply (see `execute` for `raw`), sent by its SHA1 (`sha`, or computed) once
    Redis has cached it. On a cluster, the node serving the keys' slot runs it (every key must be
    declared in `keys`, all in one slot)."""
    try:
        return await execute(redis, "EVALSHA", sha or _sha1(script), len(keys), *keys, *args, raw=raw)
    except NoScriptError:  # a restarted or flushed server, a cluster node that never ran it: EVAL caches it
        return await execute(redis, "EVAL", script, len(keys), *keys, *args, raw=raw)


@functools.cache
def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def redis_client(url: str, **overrides: Any) -> RedisClient:
    """A client with explicit timeouts: a hung Redis must fail a call, not stall it forever.
    `overrides` change or add redis-py's options (client_name=...).

    `redis://`, `rediss://` or `unix://`: one Redis. `redis+cluster://[user:password@]host:port[,host:port...]`
    (`rediss+cluster://` with TLS): a Redis Cluster, found from any of the nodes listed."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "max_connections": 200,  # on a cluster: per node
    } | overrides
    if is_cluster_url(url):
        first, others = cluster_startup_urls(url)
        nodes = [ClusterNode(host, port) for host, port in others]
        return RedisCluster.from_url(first, startup_nodes=nodes, **options)
    return Redis.from_url(url, **options)


async def get_many(redis: RedisClient, keys: list[str]) -> list[Any]:
    """The values of string `keys` that may be in different slots (several partitions' checkpoints,
    leases): one MGET on one Redis; on a cluster, one per slot (not atomic across them)."""
    if isinstance(redis, RedisCluster):
        return list(await redis.mget_nonatomic(keys))
    return list(await redis.mget(keys))

"""Every Prometheus metric of the backend, in one place (docs/operations.md says what each means).

Names follow the Prometheus conventions: the `orders_` prefix, `_total` for counters, base units
(`_seconds`). All live in prometheus-client's default registry, which the ops endpoint
(orders.server.ops_server) serves together with the process, platform and GC collectors.

Hot paths stay cheap: label children are looked up once and kept (per gRPC method, per command
and outcome, per projection), so recording is a few increments with no label parsing, and nothing
is done per event beyond a counter increment per batch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

# `*_created` series double the series count and say nothing we need.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAKEUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
PROJECTION_STATES = ("starting", "standby", "active", "paused", "failed")

# ---------------------------------------------------------------------------- gRPC servers

GRPC_HANDLED = Counter(
    "orders_grpc_server_handled_total",
    "RPCs completed by the server, by final status code (aborts with rich status included)",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING = Histogram(
    "orders_grpc_server_handling_seconds",
    "Time from the start of the handler to its end (for streams: the stream's whole life)",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge(
    "orders_grpc_server_in_flight",
    "RPCs being handled now (streams included)",
    ["grpc_service", "grpc_method"],
)

GRPC_OVERLOADED = Counter(
    "orders_grpc_server_overloaded_total",
    "Calls refused with UNAVAILABLE (reason OVERLOADED) because the process was at its limit of calls in flight",
    ["grpc_service", "grpc_method"],
)

# ---------------------------------------------------------------------------- write side

COMMANDS = Counter(
    "orders_commands_total",
    "Commands handled by the write service, by command and outcome (accepted, repeated, invalid, refused, "
    "conflict, unavailable, deadline_exceeded, error)",
    ["command", "outcome"],
)
EVENTS_APPENDED = Counter(
    "orders_events_appended_total",
    "Events committed to the event store, by event type",
    ["event_type"],
)
APPEND_BATCH_SIZE = Histogram(
    "orders_append_batch_size",
    "Commands per event-store round trip (group commit: one statement and one transaction each)",
    buckets=BATCH_BUCKETS,
)

# ---------------------------------------------------------------------------- sync worker

PROJECTION_APPLIED = Counter(
    "orders_projection_events_applied_total",
    "Events applied to a projection's live views",
    ["projection"],
)
PROJECTION_BATCH_SIZE = Histogram(
    "orders_projection_batch_size",
    "Events per batch applied to a projection's live views",
    ["projection"],
    buckets=BATCH_BUCKETS,
)
PROJECTION_LAG_EVENTS = Gauge(
    "orders_projection_lag_events",
    "Events in the log after the projection's checkpoint, estimated from positions (0 when caught up)",
    ["projection"],
)
PROJECTION_LAG_SECONDS = Gauge(
    "orders_projection_lag_seconds",
    "Age of the newest applied event while the projection is behind, or how long it has been held back "
    "by an older open transaction (0 when caught up)",
    ["projection"],
)
PROJECTION_WAKEUP = Histogram(
    "orders_projection_wakeup_seconds",
    "Time from a PostgreSQL NOTIFY reaching the worker to the start of the batch that reads it",
    ["projection"],
    buckets=WAKEUP_BUCKETS,
)
PROJECTION_STATE = Gauge(
    "orders_projection_state",
    "1 for the state this worker's loop of the projection is in, 0 for the others",
    ["projection", "state"],
)
PROJECTION_HELD_BACK = Gauge(
    "orders_projection_held_back_seconds",
    "How long an older open PostgreSQL transaction has held the projection back (the age of the horizon "
    "it waits behind), as of the loop's last step; 0 when not held back",
    ["projection"],
)

# ---------------------------------------------------------------------------- read service

READ_CACHE = Counter(
    "orders_read_cache_lookups_total",
    "GetOrder lookups in the read service's cache of hot views (read_service.hot_views), by result",
    ["result"],
)
READS_BEHIND = Counter(
    "orders_reads_behind_total",
    "Answers flagged stale because the views were older than what this read service had answered "
    "from before (a rebuild after a loss, or an older copy of Redis), by projection",
    ["projection"],
)

# ---------------------------------------------------------------------------- health

HEALTH_SERVING = Gauge(
    "orders_health_serving",
    'The process\'s gRPC health per service name: 1 SERVING, 0 NOT_SERVING ("" is the whole process, '
    "as /readyz; the read service also reports orders.projection and orders.projection.NAME)",
    ["service"],
)
PROJECTION_OWNER_AGE = Gauge(
    "orders_projection_owner_age_seconds",
    "Seconds since a projection partition's worker last wrote its heartbeat, by the Redis clock (+Inf when "
    "none ever did), as the read service sees it; a few lease ttls means the partition has no owner",
    ["projection"],
)

# ---------------------------------------------------------------------------- stores

STORE_ERRORS = Counter(
    "orders_store_errors_total",
    "PostgreSQL and Redis failures (unreachable, connection lost, timed out), by store and operation",
    ["store", "operation"],
)


# ---------------------------------------------------------------------------- recording helpers


@functools.cache
def _command_child(command: str, outcome: str) -> Any:
    return COMMANDS.labels(command, outcome)


def count_command(command: str, outcome: str) -> None:
    _command_child(command, outcome).inc()


@functools.cache
def _appended_child(event_type: str) -> Any:
    return EVENTS_APPENDED.labels(event_type)


def count_events_appended(event_types: Iterable[str]) -> None:
    for event_type in event_types:
        _appended_child(event_type).inc()


def observe_append_batch(commands: int) -> None:
    APPEND_BATCH_SIZE.observe(commands)


@functools.cache
def _store_error_child(store: str, operation: str) -> Any:
    return STORE_ERRORS.labels(store, operation)


def count_store_error(store: str, operation: str) -> None:
    """One failure of `store` ("postgres" or "redis") during `operation`."""
    _store_error_child(store, operation).inc()


@functools.cache
def _health_child(service: str) -> Any:
    return HEALTH_SERVING.labels(service)


def health_status(service: str, serving: bool) -> None:
    """What the gRPC health service now answers for `service`: SERVING or NOT_SERVING."""
    _health_child(service).set(1 if serving else 0)


def projection_owner_age(projection: str, seconds: float) -> None:
    """How old the heartbeat of partition `projection` ("orders", "orders/2") is."""
    PROJECTION_OWNER_AGE.labels(projection).set(seconds)


class ProjectionMetrics:
    """The sync worker's metrics of one projection, with their label children resolved once."""

    def __init__(self, projection: str) -> None:
        self.applied = PROJECTION_APPLIED.labels(projection)
        self.batch_size = PROJECTION_BATCH_SIZE.labels(projection)
        self.lag_events = PROJECTION_LAG_EVENTS.labels(projection)
        self.lag_seconds = PROJECTION_LAG_SECONDS.labels(projection)
        self.wakeup = PROJECTION_WAKEUP.labels(projection)
        self.held_back_seconds = PROJECTION_HELD_BACK.labels(projection)
        self._states = {state: PROJECTION_STATE.labels(projection, state) for state in PROJECTION_STATES}

    def batch_applied(self, events: int) -> None:
        self.applied.inc(events)
        self.batch_size.observe(events)

    def lag(self, events: int, seconds: float) -> None:
        self.lag_events.set(events)
        self.lag_seconds.set(seconds)

    def held_back(self, seconds: float) -> None:
        self.held_back_seconds.set(seconds)

    def state(self, state: str) -> None:
        for name, child in self._states.items():
            child.set(1 if name == state else 0)
        if state != "active":  # only an active loop steps, and so only it can say how long it waits
            self.held_back_seconds.set(0)

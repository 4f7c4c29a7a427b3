"""The soak's pure parts (orders_bench.soak_stats) and its client's bookkeeping: a window's figures
from the calls of the window, the fitted memory growth and its verdict (flat, levelled, growing),
Redis judged per order created, latency drift, the overall verdict and its text; the lag of
watched commands as the client matches acks with stream messages. Synthetic series, no timing."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from orders_bench.soak_load import LAG_GIVE_UP, Plan, Soak, Tally
from orders_bench.soak_stats import (
    FLAT_PCT_PER_HOUR,
    Window,
    call_figures,
    latency_drift,
    memory_growth,
    progress_line,
    redis_per_order,
    render_summary,
    slope_per_hour,
    summarize,
    warmup_windows,
)

WINDOW = 10.0  # seconds
LEVEL = 80.0  # MB


def times(count: int) -> list[float]:
    return [WINDOW * (n + 1) for n in range(count)]


def per_hour(pct: float, count: int) -> list[float]:
    """RSS at each window's end, growing `pct`% of LEVEL an hour."""
    return [LEVEL * (1 + pct / 100 * t / 3600) for t in times(count)]


def window(n: int, rss: dict[str, float], **extra: Any) -> Window:
    """A window record as orders_bench.soak.Sampler makes it (the parts the summary reads)."""
    orders = extra.pop("orders", 100 * (n + 1))
    keys = extra.pop("keys", 2 * orders)
    used = extra.pop("used_memory", 1_000_000 + 1000 * orders)
    figures = {"ack_p99_ms": 5.0, "query_p99_ms": 3.0, "lag_p99_ms": 8.0} | extra
    return {
        "index": n,
        "t_s": WINDOW * (n + 1),
        "commands": 3000,
        "queries": 3000,
        "errors": {},
        "orders_total": orders,
        "rss_mb": rss,
        "pss_mb": {},
        "redis": {"used_memory": used, "prefix_keys": keys},
        **figures,
    }


def steady_run(count: int = 30, **series: list[float]) -> list[Window]:
    services = {"write_service": [LEVEL] * count, "read_service": [LEVEL] * count, "sync_worker": [LEVEL] * count}
    services |= series
    return [window(n, {owner: values[n] for owner, values in services.items()}) for n in range(count)]


# ------------------------------------------------------------------------------ one window


def test_a_windows_figures_come_from_its_calls() -> None:
    """p50/p99 in ms of acks, queries and lags, their counts, and errors by code."""
    tally = Tally(acks=[0.001 * n for n in range(1, 101)], queries=[0.002] * 10, lags=[], created=25)
    tally.errors["NOT_FOUND"] += 2

    figures = call_figures(tally.as_dict())

    assert figures["ack_p50_ms"] == pytest.approx(50.5)
    assert figures["ack_p99_ms"] == pytest.approx(99.01)
    assert figures["query_p99_ms"] == pytest.approx(2.0)
    assert "lag_p99_ms" not in figures  # no lag completed in the window: no figure, not zero
    assert (figures["commands"], figures["queries"], figures["lags"], figures["orders_created"]) == (100, 10, 0, 25)
    assert figures["errors"] == {"NOT_FOUND": 2}


def test_errors_count_by_grpc_code() -> None:
    tally = Tally()
    metadata = grpc.aio.Metadata()
    tally.failed(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata))
    tally.failed(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata), "watch ")
    tally.failed(TimeoutError())
    assert tally.as_dict()["errors"] == {"UNAVAILABLE": 1, "watch UNAVAILABLE": 1, "TimeoutError": 1}


# ------------------------------------------------------------------------------ lag bookkeeping


@pytest.fixture
async def soak() -> Any:
    client = Soak(Plan("127.0.0.1:1", "127.0.0.1:1", "t", 100.0, 100.0, 2, WINDOW, 3))
    yield client
    await client.aclose()


async def test_a_watched_commands_lag_runs_from_its_ack_to_the_stream_message(soak: Soak) -> None:
    """A message at version 3 completes the acks of versions up to 3, not the one of version 4."""
    for version, acked in ((1, 100.0), (2, 100.5), (3, 101.0), (4, 101.2)):
        soak._acked_watched("o1", version, acked)
    soak._changed("o1", 3, 101.25)

    assert soak.tally.lags == pytest.approx([1.25, 0.75, 0.25])
    assert soak.pending == {"o1": [(4, 101.2)]}


async def test_a_stream_message_before_the_ack_is_no_lag(soak: Soak) -> None:
    soak._changed("o1", 2, 50.0)
    soak._acked_watched("o1", 2, 50.01)
    assert soak.tally.lags == [0.0]
    assert soak.pending == {}


async def test_watched_commands_never_seen_count_as_missing_and_are_forgotten(soak: Soak) -> None:
    soak._acked_watched("o1", 1, 10.0)
    soak._acked_watched("o2", 1, 10.0 + LAG_GIVE_UP)
    soak._expire(10.0 + LAG_GIVE_UP + 0.1)
    assert soak.tally.lag_missing == 1
    assert list(soak.pending) == ["o2"]


async def test_orders_are_spread_over_customers_and_a_share_is_watched(soak: Soak) -> None:
    """2 streams, 10 customers each: orders of customers 0 and 1 (of 20) are watched."""
    watched = [n for n in range(1, 41) if soak.watched(n)]
    assert watched == [1, 20, 21, 40]
    assert soak.customer(21) == soak.customer(1) == "tc1"


# ------------------------------------------------------------------------------ fits and verdicts


def test_the_slope_is_fitted_by_least_squares_per_hour() -> None:
    assert slope_per_hour([0, 60, 120], [10, 11, 12]) == pytest.approx(60.0)
    assert slope_per_hour([0, 60, 120], [10, 13, 10]) == pytest.approx(0.0)
    assert slope_per_hour([60], [10]) is None


def test_the_warm_up_is_a_fifth_of_the_windows_and_at_least_one() -> None:
    assert [warmup_windows(n) for n in (1, 4, 10, 90)] == [1, 1, 2, 18]


def test_memory_under_the_threshold_is_flat_and_over_it_growing() -> None:
    count = 90  # 15 minutes of 10 s windows
    flat = memory_growth("w", times(count), per_hour(FLAT_PCT_PER_HOUR / 2, count))
    leak = memory_growth("w", times(count), per_hour(FLAT_PCT_PER_HOUR * 2, count))
    shrinking = memory_growth("w", times(count), per_hour(-FLAT_PCT_PER_HOUR * 4, count))

    assert (flat.verdict, leak.verdict, shrinking.verdict) == ("flat", "growing", "flat")
    assert leak.pct_per_hour == pytest.approx(2 * FLAT_PCT_PER_HOUR, rel=0.05)
    assert leak.slope_mb_per_hour == pytest.approx(LEVEL * 2 * FLAT_PCT_PER_HOUR / 100)


def test_the_warm_up_is_left_out_of_the_fit() -> None:
    """A process that grows while it starts, then holds: flat; start is after the warm-up."""
    values = [40.0, 60.0] + [LEVEL] * 8
    growth = memory_growth("w", times(10), values)
    assert growth.verdict == "flat"
    assert (growth.start_mb, growth.end_mb) == (LEVEL, LEVEL)


def test_a_cache_that_fills_then_holds_has_levelled() -> None:
    """Growth over the first half of the fit, flat in the last half: a bounded cache, not a leak."""
    count = 90
    values = [LEVEL + min(n, 45) * 0.2 for n in range(count)]
    growth = memory_growth("w", times(count), values)
    assert growth.verdict == "levelled"
    assert growth.last_half_pct_per_hour == pytest.approx(0.0, abs=1e-6)


def test_too_few_windows_give_no_verdict() -> None:
    assert memory_growth("w", times(1), [LEVEL]).verdict == "too short"
    assert redis_per_order(steady_run(2)).verdict == "too short"
    assert latency_drift("ack", steady_run(2)).verdict == "too short"


def test_redis_that_grows_with_the_orders_grows_with_the_data() -> None:
    per_order = redis_per_order(steady_run(30))
    assert per_order.verdict == "grows with the data"
    assert per_order.bytes_end == pytest.approx(1000)
    assert per_order.keys_end == pytest.approx(2)


def test_redis_keys_that_pile_up_beyond_the_orders_grow_faster_than_the_data() -> None:
    """Keys per order rising over the run (keys left behind) fail; less per order does not."""
    leaking = [window(n, {}, keys=2 * 100 * (n + 1) + 10 * n * n) for n in range(30)]
    thinning = [window(n, {}, used_memory=5_000_000 + 900 * 100 * (n + 1)) for n in range(30)]
    assert redis_per_order(leaking).verdict == "grows faster than the data"
    assert redis_per_order(thinning).verdict == "grows with the data"


def test_latency_is_compared_third_against_third_after_the_warm_up() -> None:
    rising = [window(n, {}, ack_p99_ms=5.0 + n) for n in range(30)]
    drift = latency_drift("ack", rising)
    assert drift.verdict == "rising"
    assert drift.first_ms == pytest.approx(5.0 + 6 + 3.5)  # windows 6..13: the first third of 24
    assert latency_drift("ack", steady_run(30)).verdict == "flat"


# ------------------------------------------------------------------------------ the run


def test_a_steady_run_is_flat_and_says_so() -> None:
    summary = summarize(steady_run(30))
    assert summary.flat
    text = render_summary(summary)
    assert "verdict: flat" in text
    for owner in ("write_service", "read_service", "sync_worker"):
        assert owner in text
    assert summary.as_dict()["flat"] is True


def test_one_leaking_service_makes_the_run_not_flat() -> None:
    summary = summarize(steady_run(90, read_service=per_hour(4 * FLAT_PCT_PER_HOUR, 90)))
    verdicts = {g.owner: g.verdict for g in summary.growth}
    assert verdicts == {"write_service": "flat", "read_service": "growing", "sync_worker": "flat"}
    assert not summary.flat
    assert "verdict: NOT flat" in render_summary(summary)


def test_postgres_is_reported_but_not_in_the_verdict() -> None:
    """Its buffers fill as the data grows: judged from its proportional share, reported, not counted."""
    windows = steady_run(30)
    for n, w in enumerate(windows):
        w["rss_mb"]["postgres"] = 300.0 + 10 * n  # shared buffers counted once per process
        w["pss_mb"]["postgres"] = 100.0 + 5 * n
    summary = summarize(windows)
    [postgres] = [g for g in summary.growth if g.owner == "postgres"]
    assert postgres.verdict == "growing"
    assert postgres.end_mb == pytest.approx(245.0)
    assert summary.flat


def test_the_progress_line_names_the_window_and_the_figures() -> None:
    line = progress_line(window(4, {"write_service": 70.4, "redis": 21.0}))
    assert line.startswith("window 5: 3000 cmds, 3000 queries, ack p99 5.0 ms")
    assert "write 70 redis 21" in line
    assert "500 orders, 1,000 keys" in line

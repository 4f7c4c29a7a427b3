"""The order view projection (sync_worker.projection): a pure fold of recorded events into views."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from orders.domain.commands import AddItem, CreateOrder
from orders.domain.events import (
    Address,
    Event,
    ItemAdded,
    ItemRemoved,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderShipped,
    RecordedEvent,
    ShippingAddressChanged,
)
from orders.domain.status import OrderStatus
from orders.store.views import OrderView, ViewLine
from sync_worker.projection import ProjectionGap, fold, project
from tests.unit.strategies import PROPERTY_SETTINGS, History, histories, micros, run

OID = "order-1"
ADDRESS = Address("Ada Lovelace", "1 Main Street", "Berlin", "10115", "DE")
OTHER_ADDRESS = Address("Grace Hopper", "5 Rue de Rivoli", "Paris", "75001", "FR", line2="Apt 4", region="IDF")
T0 = datetime(2025, 3, 1, 12, 0, 0, 250_001, tzinfo=UTC)


def at(version: int) -> datetime:
    """A distinct, increasing recording time per version."""
    return T0 + timedelta(seconds=version, microseconds=version)


def recorded(version: int, event: Event, stream: str = OID, when: datetime | None = None) -> RecordedEvent:
    return RecordedEvent(
        position=100 + version,
        tx_id=50 + version,
        stream_id=stream,
        version=version,
        event=event,
        recorded_at=at(version) if when is None else when,
    )


def project_all(*events: Event) -> OrderView:
    """The view after `events`, recorded as versions 1, 2, ... of one order."""
    view: OrderView | None = None
    for version, event in enumerate(events, start=1):
        view = project(view, recorded(version, event))
    assert view is not None
    return view


CREATED = OrderCreated("cust-1", "EUR", ADDRESS)
BASE_VIEW = OrderView(
    order_id=OID,
    customer_id="cust-1",
    currency_code="EUR",
    status="PENDING",
    created_at_us=micros(at(1)),
    updated_at_us=micros(at(1)),
    version=1,
    shipping_address=ADDRESS,
)


def test_order_created_starts_a_pending_view() -> None:
    """The first event gives a PENDING view of the stream's order at version 1, created = updated = recorded_at."""
    expected = BASE_VIEW
    assert expected == project(None, recorded(1, CREATED))


def test_order_created_without_address_has_none() -> None:
    """An order created without an address has no address in its view."""
    expected = (None, "cust-9", "JPY")

    view = project(None, recorded(1, OrderCreated("cust-9", "JPY")))

    assert expected == (view.shipping_address, view.customer_id, view.currency_code)


@pytest.mark.parametrize(
    ("event", "expected_changes"),
    [
        pytest.param(ItemAdded("A", "Apple", 2, 30), {"lines": (ViewLine("A", "Apple", 2, 30),)}, id="item-added"),
        pytest.param(ItemRemoved("missing"), {}, id="item-removed-absent"),
        pytest.param(ShippingAddressChanged(OTHER_ADDRESS), {"shipping_address": OTHER_ADDRESS}, id="address-changed"),
        pytest.param(OrderConfirmed(), {"status": "CONFIRMED"}, id="confirmed"),
        pytest.param(
            OrderShipped("DHL", "JD0001"),
            {"status": "SHIPPED", "carrier": "DHL", "tracking_number": "JD0001"},
            id="shipped",
        ),
        pytest.param(
            OrderCancelled("changed my mind"),
            {"status": "CANCELLED", "cancellation_reason": "changed my mind"},
            id="cancelled",
        ),
    ],
)
def test_each_event_changes_its_fields_and_bumps_version_and_updated_at(
    event: Event, expected_changes: dict[str, Any]
) -> None:
    """An event changes only its own fields, plus version and updated_at (from its recorded_at)."""
    expected = replace(BASE_VIEW, **expected_changes, version=2, updated_at_us=micros(at(2)))

    assert expected == project(BASE_VIEW, recorded(2, event))


@pytest.mark.parametrize(
    ("events", "expected_lines"),
    [
        pytest.param(
            [ItemAdded("A", "Apple", 2, 30), ItemAdded("A", "Apple", 5, 30)],
            (ViewLine("A", "Apple", 7, 30),),
            id="same-sku-merges",
        ),
        pytest.param(
            [ItemAdded("A", "Apple", 2, 30), ItemAdded("B", "Pear", 1, 40), ItemAdded("A", "Apple", 1, 30)],
            (ViewLine("A", "Apple", 3, 30), ViewLine("B", "Pear", 1, 40)),
            id="merge-keeps-position",
        ),
        pytest.param(
            [ItemAdded("A", "Apple", 2, 30), ItemAdded("B", "Pear", 1, 40), ItemRemoved("A")],
            (ViewLine("B", "Pear", 1, 40),),
            id="removal",
        ),
        pytest.param(
            [
                ItemAdded("A", "Apple", 2, 30),
                ItemAdded("B", "Pear", 1, 40),
                ItemRemoved("A"),
                ItemAdded("A", "Apple", 1, 9),
            ],
            (ViewLine("B", "Pear", 1, 40), ViewLine("A", "Apple", 1, 9)),
            id="readded-goes-last-with-new-price",
        ),
    ],
)
def test_item_events_build_the_lines(events: list[Event], expected_lines: tuple[ViewLine, ...]) -> None:
    """ItemAdded merges into an existing sku's line in place or appends one; ItemRemoved drops the line."""
    assert expected_lines == project_all(CREATED, *events).lines


def test_total_is_the_sum_of_line_totals() -> None:
    """The view's total is quantity x unit price summed over its lines."""
    expected = 3 * 199 + 2 * 1000

    view = project_all(CREATED, ItemAdded("A", "Apple", 3, 199), ItemAdded("B", "Pear", 2, 1000))

    assert expected == view.total_minor


def test_total_of_an_empty_order_is_zero() -> None:
    """An order without lines totals 0."""
    expected = 0

    assert expected == BASE_VIEW.total_minor


def test_created_at_stays_and_updated_at_follows_the_last_event() -> None:
    """created_at is the first event's time; updated_at and version follow the latest event."""
    view = project_all(CREATED, ItemAdded("A", "Apple", 1, 1), OrderConfirmed(), OrderShipped())

    assert (micros(at(1)), micros(at(4)), 4) == (view.created_at_us, view.updated_at_us, view.version)


@pytest.mark.parametrize(
    ("recorded_at", "expected_us"),
    [
        pytest.param(datetime(1970, 1, 1, tzinfo=UTC), 0, id="epoch"),
        pytest.param(datetime(2025, 3, 1, 12, 0, 0, 1, tzinfo=UTC), 1_740_830_400_000_001, id="one-microsecond"),
        pytest.param(datetime(2025, 3, 1, 12, 0, 0, 999_999, tzinfo=UTC), 1_740_830_400_999_999, id="max-micro"),
        pytest.param(
            datetime(2025, 3, 1, 14, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=2))),
            1_740_830_400_123_456,
            id="other-utc-offset",
        ),
        pytest.param(
            datetime(2040, 8, 30, 18, 24, 40, 161_390, tzinfo=UTC),
            2_229_963_880_161_390,
            id="after-2038",
        ),
        pytest.param(
            datetime(2004, 9, 10, 3, 16, 0, 960_708, tzinfo=UTC),
            1_094_786_160_960_708,
            id="in-2004",
        ),
    ],
)
def test_times_are_exact_microseconds_of_recorded_at(recorded_at: datetime, expected_us: int) -> None:
    """created_at_us/updated_at_us are exactly recorded_at in microseconds since the epoch, whatever the offset."""
    view = project(None, recorded(1, CREATED, when=recorded_at))

    assert (expected_us, expected_us) == (view.created_at_us, view.updated_at_us)


# --- gaps: events that do not follow the view ------------------------------------------------


@pytest.mark.parametrize(
    ("view", "event"),
    [
        pytest.param(None, recorded(2, CREATED), id="first-event-not-version-1"),
        pytest.param(None, recorded(1, ItemAdded("A", "Apple", 1, 1)), id="first-event-not-created"),
        pytest.param(None, recorded(1, OrderConfirmed()), id="first-event-confirmed"),
        pytest.param(BASE_VIEW, recorded(3, OrderConfirmed()), id="version-skipped"),
        pytest.param(BASE_VIEW, recorded(1, OrderConfirmed()), id="version-repeated"),
        pytest.param(BASE_VIEW, recorded(1, CREATED), id="created-repeated"),
        pytest.param(BASE_VIEW, recorded(2, CREATED), id="created-again-as-next-version"),
    ],
)
def test_events_out_of_sequence_raise_projection_gap(view: OrderView | None, event: RecordedEvent) -> None:
    """An event that is not the view's next version, or a stream not starting with OrderCreated, is a gap."""
    with pytest.raises(ProjectionGap):
        project(view, event)


def test_gap_message_names_order_versions_and_position() -> None:
    """The gap says which order, which version arrived at which position, and which was expected."""
    with pytest.raises(ProjectionGap) as caught:
        project(BASE_VIEW, recorded(3, OrderConfirmed()))

    expected = "order 'order-1': got event version 3 at position 103, expected version 2"
    assert expected == str(caught.value)


def test_fold_projects_each_stream_separately() -> None:
    """fold keeps one view per stream, however the streams' events interleave."""
    log = [
        recorded(1, CREATED, stream="a"),
        recorded(1, OrderCreated("cust-2", "USD"), stream="b"),
        recorded(2, ItemAdded("A", "Apple", 1, 5), stream="a"),
        recorded(2, OrderCancelled("x"), stream="b"),
    ]

    expected = {"a": ("PENDING", 2, 5), "b": ("CANCELLED", 2, 0)}

    views = fold(log)

    assert expected == {stream: (view.status, view.version, view.total_minor) for stream, view in views.items()}


def test_fold_of_nothing_is_no_views() -> None:
    """An empty log has no views."""
    expected: dict[str, OrderView] = {}

    assert expected == fold([])


def test_fold_raises_on_a_gap_in_any_stream() -> None:
    """A skipped version in one stream fails the whole fold."""
    log = [recorded(1, CREATED, stream="a"), recorded(1, CREATED, stream="b"), recorded(3, OrderConfirmed(), "a")]

    with pytest.raises(ProjectionGap):
        fold(log)


def test_read_and_write_model_agree_on_the_name_of_a_merged_line() -> None:
    """Adding the same sku at the same price under a new name: both models show the same line name."""
    history = run(
        [
            CreateOrder(OID, "cust-1", "EUR"),
            AddItem(OID, "SKU-1", "Widget", 1, 100, "EUR"),
            AddItem(OID, "SKU-1", "Widget v2", 1, 100, "EUR"),
        ]
    )
    expected_version = 3  # both adds were accepted
    assert expected_version == history.states[OID].version

    view = fold(history.log)[OID]

    assert [line.name for line in history.states[OID].lines.values()] == [line.name for line in view.lines]


# --- the read model never disagrees with the write model ---------------------------------------


@PROPERTY_SETTINGS
@given(histories())
def test_projected_views_agree_with_the_domain_state(history: History) -> None:
    """For any event log the domain accepts, each order's view has the status, lines (sku, quantity,
    price, in order), address and version of the write model's state from replay, and its times
    are those of its first and last events."""
    views = fold(history.log)

    assert set(history.states) == set(views)
    for order_id, state in history.states.items():
        view = views[order_id]
        stream = [event for event in history.log if event.stream_id == order_id]
        assert OrderStatus(view.status) == state.status
        assert [(line.sku, line.quantity, line.unit_price_minor) for line in view.lines] == [
            (line.sku, line.quantity, line.unit_price_minor) for line in state.lines.values()
        ]
        assert state.shipping_address == view.shipping_address
        assert state.version == view.version
        assert (state.customer_id, state.currency_code) == (view.customer_id, view.currency_code)
        assert sum(line.quantity * line.unit_price_minor for line in state.lines.values()) == view.total_minor
        assert (micros(stream[0].recorded_at), micros(stream[-1].recorded_at)) == (
            view.created_at_us,
            view.updated_at_us,
        )


@PROPERTY_SETTINGS
@given(histories(), st.data())
def test_a_lost_event_is_detected_unless_it_is_the_last_of_its_stream(history: History, data: st.DataObject) -> None:
    """Dropping one event from a valid log makes the fold raise ProjectionGap exactly when a later
    event of the same stream follows it (the gap is visible); a lost tail is indistinguishable."""
    assume(history.log)
    index = data.draw(st.integers(0, len(history.log) - 1), label="dropped")
    dropped = history.log[index]
    followed = any(event.stream_id == dropped.stream_id for event in history.log[index + 1 :])

    try:
        fold([*history.log[:index], *history.log[index + 1 :]])
    except ProjectionGap:
        detected = True
    else:
        detected = False

    assert followed == detected


@PROPERTY_SETTINGS
@given(histories(), st.data())
def test_a_redelivered_event_is_a_gap(history: History, data: st.DataObject) -> None:
    """Applying any event a second time (a redelivery) raises ProjectionGap instead of double counting."""
    assume(history.log)
    index = data.draw(st.integers(0, len(history.log) - 1), label="repeated")
    log = history.log[: index + 1]

    with pytest.raises(ProjectionGap):
        fold([*log, log[index]])

"""The pure parts of the `orders` command line: prices, money, times, tables, arguments and error lines."""

from __future__ import annotations

import argparse
import os

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from orders.cli.format import (
    PriceError,
    format_money,
    format_time,
    minor_unit_exponent,
    order_details,
    order_line,
    orders_table,
    parse_price,
    render_table,
    status_name,
    status_value,
    summary_details,
)
from orders.cli.main import build_parser, error_lines
from orders.client import FieldViolation, OrdersRpcError
from orders.v1 import queries_pb2, types_pb2

USAGE_ERROR = 2


@pytest.fixture(autouse=True)
def no_orders_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without any ORDERS_* variable from the developer's or CI's environment."""
    for name in list(os.environ):
        if name.startswith("ORDERS_"):
            monkeypatch.delenv(name)


def eur(minor: int) -> types_pb2.Money:
    return types_pb2.Money(currency_code="EUR", minor_units=minor)


def at(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def an_order() -> types_pb2.Order:
    return types_pb2.Order(
        order_id="order-1",
        customer_id="alice",
        status=types_pb2.ORDER_STATUS_SHIPPED,
        items=[
            types_pb2.LineItem(sku="SKU-1", name="Widget", quantity=3, unit_price=eur(120), line_total=eur(360)),
            types_pb2.LineItem(sku="SKU-22", name="Gadget", quantity=1, unit_price=eur(1999), line_total=eur(1999)),
        ],
        total=eur(2359),
        shipping_address=types_pb2.ShippingAddress(
            recipient="Ada Lovelace", line1="Main St 1", city="Berlin", postal_code="10115", country_code="DE"
        ),
        created_at=at(1_750_000_000),
        updated_at=at(1_750_000_300),
        version=5,
        carrier="DHL",
        tracking_number="00340434",
    )


# ---------------------------------------------------------------------------- prices


@pytest.mark.parametrize(
    ("text", "currency", "expected"),
    [
        ("1.20", "EUR", 120),
        ("1.2", "EUR", 120),
        ("1", "EUR", 100),
        ("0.29", "EUR", 29),  # 0.29 * 100 is 28.999999999999996 in floating point
        ("0", "EUR", 0),
        ("1.990", "EUR", 199),  # trailing zeros are not extra precision
        ("300", "JPY", 300),
        ("1.0", "JPY", 1),
        ("1.250", "KWD", 1250),
        ("0.001", "BHD", 1),
        ("2.5", "usd", 250),  # currency codes in any case
        ("1.5", "XYZ", 150),  # unknown currencies have 2 decimal places
        ("12345678901234567.89", "EUR", 1234567890123456789),  # no rounding, however long
        (" 3.50 ", "EUR", 350),
    ],
)
def test_price_converts_to_minor_units_exactly(text: str, currency: str, expected: int) -> None:
    """A price in major units becomes minor units by the currency's exponent, without any rounding."""
    assert parse_price(text, currency) == expected


def test_price_with_more_decimal_places_than_the_currency_is_refused() -> None:
    """1.999 EUR is refused, naming the places given and the currency's, instead of being rounded."""
    with pytest.raises(PriceError) as raised:
        parse_price("1.999", "EUR")
    expected = "price 1.999 has 3 decimal places, but EUR has 2; give a price such as 1.99 or use --price-minor"
    assert str(raised.value) == expected


@pytest.mark.parametrize(("text", "currency"), [("1.5", "JPY"), ("0.01", "KRW"), ("1.2345", "KWD"), ("0.001", "EUR")])
def test_price_finer_than_the_currency_is_refused(text: str, currency: str) -> None:
    """Each currency refuses prices below its minor unit: 1.5 JPY, 1.2345 KWD, 0.001 EUR."""
    with pytest.raises(PriceError, match=rf"but {currency} has {minor_unit_exponent(currency)};"):
        parse_price(text, currency)


def test_negative_price_is_refused() -> None:
    """A negative price is refused with a message saying so."""
    with pytest.raises(PriceError) as raised:
        parse_price("-1.00", "EUR")
    assert str(raised.value) == "price -1.00 is negative; a price is 0 or more"


@pytest.mark.parametrize("text", ["", "abc", "1,50", "1e3", "NaN", "Infinity", "1.", ".5", "1.2.3", "+1"])
def test_price_that_is_not_a_plain_decimal_is_refused(text: str) -> None:
    """Only digits with an optional decimal point and fraction are prices: no exponents, NaN or commas."""
    with pytest.raises(PriceError) as raised:
        parse_price(text, "EUR")
    assert str(raised.value) == f"price {text!r} is not a decimal number such as 1.99"


def test_minor_unit_exponents_follow_iso_4217() -> None:
    """2 decimal places for most currencies, 0 for JPY and KRW, 3 for BHD and KWD, 4 for CLF."""
    found = {code: minor_unit_exponent(code) for code in ("EUR", "USD", "JPY", "KRW", "BHD", "KWD", "CLF")}
    assert found == {"EUR": 2, "USD": 2, "JPY": 0, "KRW": 0, "BHD": 3, "KWD": 3, "CLF": 4}


# ---------------------------------------------------------------------------- money, times, names


@pytest.mark.parametrize(
    ("minor", "currency", "expected"),
    [
        (1240, "EUR", "12.40 EUR"),
        (5, "EUR", "0.05 EUR"),
        (0, "EUR", "0.00 EUR"),
        (-5, "EUR", "-0.05 EUR"),
        (1200, "JPY", "1200 JPY"),
        (1250, "KWD", "1.250 KWD"),
        (9_223_372_036_854_775_807, "EUR", "92233720368547758.07 EUR"),
    ],
)
def test_money_is_formatted_with_the_currency_digits(minor: int, currency: str, expected: str) -> None:
    """Money shows the currency's number of decimal places and its code."""
    assert format_money(types_pb2.Money(currency_code=currency, minor_units=minor)) == expected


def test_money_without_currency_is_a_dash() -> None:
    """An unset Money shows as "-"."""
    assert format_money(types_pb2.Money()) == "-"


def test_times_are_utc_to_the_second() -> None:
    """Timestamps show in UTC without fractions; an unset one shows as "-"."""
    assert (format_time(Timestamp(seconds=1_750_000_300, nanos=999_000_000)), format_time(Timestamp())) == (
        "2025-06-15 15:11:40Z",
        "-",
    )


def test_status_names_round_trip() -> None:
    """Statuses show in lower case without the enum prefix, and the names parse back."""
    names = [status_name(status) for status in (types_pb2.ORDER_STATUS_PENDING, types_pb2.ORDER_STATUS_CANCELLED)]
    assert (names, status_value("shipped")) == (["pending", "cancelled"], types_pb2.ORDER_STATUS_SHIPPED)


# ---------------------------------------------------------------------------- tables


def test_table_pads_columns_and_aligns_right_ones() -> None:
    """Cells are padded to the widest of their column, two spaces apart, chosen columns right-aligned."""
    table = render_table(("NAME", "N"), [("a", "1"), ("longer", "123")], right={1})
    assert table == "NAME      N\na         1\nlonger  123"


def test_orders_table_shows_one_row_per_order() -> None:
    """The orders list shows id, customer, status, units, total and last change."""
    pending = types_pb2.Order(
        order_id="o2", customer_id="bob", status=types_pb2.ORDER_STATUS_PENDING, total=eur(0), updated_at=at(0)
    )
    expected = (
        "ORDER    CUSTOMER  STATUS   ITEMS      TOTAL  UPDATED\n"
        "order-1  alice     shipped      4  23.59 EUR  2025-06-15 15:11:40Z\n"
        "o2       bob       pending      0   0.00 EUR  -"
    )
    assert orders_table([an_order(), pending]) == expected


def test_order_details_show_a_header_block_and_an_items_table() -> None:
    """One order shows its fields aligned, then a table of its items."""
    expected = """\
order       order-1
customer    alice
status      shipped
version     5
total       23.59 EUR
ship to     Ada Lovelace, Main St 1, 10115 Berlin, DE
shipped by  DHL, tracking number 00340434
created     2025-06-15 15:06:40Z
updated     2025-06-15 15:11:40Z

SKU     NAME    QTY  UNIT PRICE  LINE TOTAL
SKU-1   Widget    3    1.20 EUR    3.60 EUR
SKU-22  Gadget    1   19.99 EUR   19.99 EUR"""
    assert order_details(an_order()) == expected


def test_cancelled_order_without_items_shows_reason_and_no_items() -> None:
    """A cancelled order shows why, and "no items" instead of an empty table."""
    order = types_pb2.Order(
        order_id="o3", customer_id="c", status=types_pb2.ORDER_STATUS_CANCELLED, total=eur(0), version=2
    )
    order.cancellation_reason = "changed my mind"
    details = order_details(order)
    assert details.splitlines()[6:] == ["reason    changed my mind", "created   -", "updated   -", "", "no items"]


def test_summary_shows_counts_by_status_and_spend_per_currency() -> None:
    """A customer summary counts orders per status and lists the spend in each currency."""
    summary = queries_pb2.CustomerSummary(
        customer_id="alice",
        order_count=3,
        orders_by_status=[
            queries_pb2.StatusCount(status=types_pb2.ORDER_STATUS_PENDING, count=1),
            queries_pb2.StatusCount(status=types_pb2.ORDER_STATUS_SHIPPED, count=2),
        ],
        lifetime_spend=[eur(360), types_pb2.Money(currency_code="JPY", minor_units=600)],
        first_order_at=at(1_750_000_000),
        last_order_at=at(1_750_000_300),
    )
    expected = """\
customer        alice
orders          3 (pending 1, shipped 2)
lifetime spend  3.60 EUR, 600 JPY
first order     2025-06-15 15:06:40Z
last order      2025-06-15 15:11:40Z"""
    assert summary_details(summary) == expected


def test_watch_line_shows_version_status_units_and_total() -> None:
    """Watch prints one line per order version."""
    expected = "order-1 version 5: shipped, 4 items, 23.59 EUR (2025-06-15 15:11:40Z)"
    assert order_line(an_order()) == expected


# ---------------------------------------------------------------------------- arguments and errors


def test_global_options_work_before_and_after_the_subcommand() -> None:
    """--json and the addresses may follow the subcommand, and then override the ones before it."""
    before = build_parser().parse_args(["--json", "--write-address", "h:1", "confirm", "o1"])
    after = build_parser().parse_args(["--write-address", "h:1", "confirm", "o1", "--json", "--write-address", "h:2"])
    plain = build_parser().parse_args(["confirm", "o1"])
    found = [(args.json, args.write_address) for args in (before, after, plain)]
    assert found == [(True, "h:1"), (True, "h:2"), (False, "127.0.0.1:50051")]


def test_addresses_and_timeout_default_from_the_services_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """ORDERS_WRITE_ADDRESS, ORDERS_READ_ADDRESS and ORDERS_TIMEOUT are the defaults, as for the services."""
    monkeypatch.setenv("ORDERS_WRITE_ADDRESS", "writer:7001")
    monkeypatch.setenv("ORDERS_READ_ADDRESS", "reader:7002")
    monkeypatch.setenv("ORDERS_TIMEOUT", "2.5")
    args = build_parser().parse_args(["get", "o1"])
    assert (args.write_address, args.read_address, args.timeout) == ("writer:7001", "reader:7002", 2.5)


def test_watch_timeout_is_how_long_to_watch() -> None:
    """`watch --timeout` limits the watch; without it the watch has no end, whatever the call timeout."""
    limited = build_parser().parse_args(["watch", "o1", "--timeout", "3"])
    endless = build_parser().parse_args(["--timeout", "3", "watch", "o1"])
    assert (limited.watch_timeout, endless.watch_timeout, endless.timeout) == (3.0, None, 3.0)


def test_bad_address_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed address stops with status 2 and one line naming the flag."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["get", "o1", "--read-address", "nowhere"])
    error = capsys.readouterr().err
    expected = (
        "orders get: error: argument --read-address: expected HOST:PORT such as 127.0.0.1:50051, "
        "got 'nowhere' (see --help)\n"
    )
    assert (exited.value.code, error) == (USAGE_ERROR, expected)


def test_price_and_price_minor_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    """add-item takes --price or --price-minor, not both."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(
            ["add-item", "o1", "--sku", "S", "--name", "N", "--quantity", "1", "--price", "1", "--price-minor", "1"]
        )
    assert (exited.value.code, "not allowed with argument" in capsys.readouterr().err) == (USAGE_ERROR, True)


def args_for(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    args.command_id = getattr(args, "command_id", None) or "cmd-1"
    return args


def test_error_lines_name_code_reason_and_each_field_violation() -> None:
    """A refused call shows code and reason in one line, then one indented line per bad field (the message
    only repeats the violations)."""
    error = OrdersRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad request",
        reason="BAD_THINGS",
        field_violations=[FieldViolation("quantity", "must be 1-10000, got 0"), FieldViolation("sku", "too long")],
    )
    expected = [
        "orders: INVALID_ARGUMENT BAD_THINGS: invalid request",
        "  quantity: must be 1-10000, got 0",
        "  sku: too long",
    ]
    assert error_lines(error, "write", args_for("confirm", "o1")) == expected


def test_error_reason_equal_to_the_code_is_not_repeated() -> None:
    """INVALID_ARGUMENT with reason INVALID_ARGUMENT shows the name once."""
    error = OrdersRpcError(grpc.StatusCode.INVALID_ARGUMENT, "no", reason="INVALID_ARGUMENT")
    assert error_lines(error, "read", args_for("get", "o1")) == ["orders: INVALID_ARGUMENT: no"]


def test_unreachable_service_names_its_address_and_setting() -> None:
    """UNAVAILABLE without a reason (no server answered) hints at the address and its setting."""
    error = OrdersRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    lines = error_lines(error, "read", args_for("--read-address", "10.0.0.9:50052", "get", "o1"))
    assert lines == [
        "orders: UNAVAILABLE: failed to connect to all addresses",
        "orders: is the read service running at 10.0.0.9:50052? Set its address with --read-address or "
        "ORDERS_READ_ADDRESS",
    ]


def test_command_past_its_deadline_names_its_command_id() -> None:
    """A command that timed out may have been applied: the hint says how to repeat it at most once."""
    error = OrdersRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", reason="DEADLINE_EXCEEDED")
    lines = error_lines(error, "write", args_for("confirm", "o1", "--command-id", "c-42"))
    assert lines == [
        "orders: DEADLINE_EXCEEDED: Deadline Exceeded",
        "orders: the command may or may not have been applied; run it again with --command-id c-42 to apply it "
        "at most once",
    ]


@pytest.mark.parametrize("variable", ["ORDERS_LOG_LEVEL", "ORDERS_LOG_FORMAT"])
def test_a_bad_log_setting_is_refused_as_the_services_refuse_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str
) -> None:
    """ORDERS_LOG_LEVEL=LOUD is not ignored: one error line naming the flag and the variable, status 2."""
    monkeypatch.setenv(variable, "LOUD")

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["get", "order-1"])

    [line] = capsys.readouterr().err.splitlines()
    assert caught.value.code == USAGE_ERROR
    flag = variable.removeprefix("ORDERS_").lower().replace("_", "-")
    assert f"orders: error: argument --{flag}: ({variable}) expected " in line
    assert "got 'LOUD'" in line

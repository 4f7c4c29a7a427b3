"""What the `orders` command line shows: prices read from people, money, times and tables.

Pure functions of protobuf messages and strings, so that they are tested without servers.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from datetime import UTC
from decimal import Context, Decimal

from google.protobuf.timestamp_pb2 import Timestamp

from orders.v1 import queries_pb2, types_pb2

# ISO 4217 minor-unit exponents other than 2: 0 for currencies without a minor unit, 3 for
# thousandths (fils, baisa, millime), 4 for the Chilean and Uruguayan units of account.
MINOR_UNIT_EXPONENTS: dict[str, int] = (
    dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG"), 0)
    | dict.fromkeys(("RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"), 0)
    | dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3)
    | dict.fromkeys(("CLF", "UYW"), 4)
)
DEFAULT_EXPONENT = 2
_PRICE = re.compile(r"(-?)(\d{1,20})(?:\.(\d{1,20}))?")
_EXACT = Context(prec=60)  # more digits than any price the pattern admits: scaleb never rounds
STATUS_NAMES = ("pending", "confirmed", "shipped", "cancelled")
ORDER_COLUMNS = ("ORDER", "CUSTOMER", "STATUS", "ITEMS", "TOTAL", "UPDATED")
ITEM_COLUMNS = ("SKU", "NAME", "QTY", "UNIT PRICE", "LINE TOTAL")


class PriceError(ValueError):
    """A price that is not a non-negative amount the currency can express exactly."""


def minor_unit_exponent(currency_code: str) -> int:
    """Digits after the decimal point in `currency_code`: 2 for EUR, 0 for JPY, 3 for KWD."""
    return MINOR_UNIT_EXPONENTS.get(currency_code.upper(), DEFAULT_EXPONENT)


def parse_price(text: str, currency_code: str) -> int:
    """A price in major units ("1.99") as minor units of `currency_code` (199), exactly, or PriceError."""
    match = _PRICE.fullmatch(text.strip())
    if match is None:
        raise PriceError(f"price {text!r} is not a decimal number such as 1.99")
    sign, _, fraction = match.groups()
    amount = Decimal(match.group())
    if sign and amount != 0:
        raise PriceError(f"price {text} is negative; a price is 0 or more")
    exponent = minor_unit_exponent(currency_code)
    minor = amount.scaleb(exponent, _EXACT)
    if minor != minor.to_integral_value():
        places = len((fraction or "").rstrip("0"))
        raise PriceError(
            f"price {text} has {places} decimal places, but {currency_code} has {exponent}; "
            f"give a price such as {format_amount(199 * 10**exponent // 100, exponent)} or use --price-minor"
        )
    return int(minor)


def format_amount(minor_units: int, exponent: int) -> str:
    """Minor units as a decimal amount with the currency's digits: (1240, 2) is "12.40"."""
    whole, fraction = divmod(abs(minor_units), 10**exponent)
    sign = "-" if minor_units < 0 else ""
    return f"{sign}{whole}.{fraction:0{exponent}d}" if exponent else f"{sign}{whole}"


def format_money(money: types_pb2.Money) -> str:
    """ "12.40 EUR", "1200 JPY", "1.250 KWD"; "-" for no currency."""
    if not money.currency_code:
        return "-"
    return f"{format_amount(money.minor_units, minor_unit_exponent(money.currency_code))} {money.currency_code}"


def format_time(timestamp: Timestamp) -> str:
    """A timestamp in UTC to the second ("2025-06-01 12:00:03Z"); "-" when unset."""
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return "-"
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def status_name(status: types_pb2.OrderStatus.ValueType) -> str:
    """ORDER_STATUS_SHIPPED as "shipped"."""
    return types_pb2.OrderStatus.Name(status).removeprefix("ORDER_STATUS_").lower()


def status_value(name: str) -> types_pb2.OrderStatus.ValueType:
    """ "shipped" as ORDER_STATUS_SHIPPED."""
    return types_pb2.OrderStatus.Value(f"ORDER_STATUS_{name.upper()}")


def units(order: types_pb2.Order) -> int:
    """How many units the order holds, over all its lines."""
    return sum(item.quantity for item in order.items)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """Columns padded to their widest cell, two spaces apart; columns in `right` aligned right."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def orders_table(orders: Sequence[types_pb2.Order]) -> str:
    """One row per order: id, customer, status, units, total, last change."""
    rows = [
        (
            o.order_id,
            o.customer_id,
            status_name(o.status),
            str(units(o)),
            format_money(o.total),
            format_time(o.updated_at),
        )
        for o in orders
    ]
    return render_table(ORDER_COLUMNS, rows, right={3, 4})


def items_table(items: Sequence[types_pb2.LineItem]) -> str:
    rows = [(i.sku, i.name, str(i.quantity), format_money(i.unit_price), format_money(i.line_total)) for i in items]
    return render_table(ITEM_COLUMNS, rows, right={2, 3, 4})


def format_address(address: types_pb2.ShippingAddress) -> str:
    """ "Ada Lovelace, Main St 1, 10115 Berlin, DE"; "-" when the order has none."""
    if not address.recipient:
        return "-"
    parts = [address.recipient, address.line1, address.line2, f"{address.postal_code} {address.city}"]
    parts += [address.region, address.country_code]
    return ", ".join(part for part in parts if part.strip())


def render_fields(fields: Sequence[tuple[str, str]]) -> str:
    """ "name   value" lines, the values aligned."""
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


def order_details(order: types_pb2.Order) -> str:
    """A header block with the order's fields, then a table of its items."""
    fields = [
        ("order", order.order_id),
        ("customer", order.customer_id),
        ("status", status_name(order.status)),
        ("version", str(order.version)),
        ("total", format_money(order.total)),
        ("ship to", format_address(order.shipping_address)),
    ]
    if order.carrier or order.tracking_number:
        tracking = f"tracking number {order.tracking_number}" if order.tracking_number else ""
        fields.append(("shipped by", ", ".join(filter(None, (order.carrier, tracking)))))
    if order.status == types_pb2.ORDER_STATUS_CANCELLED:
        fields.append(("reason", order.cancellation_reason or "-"))
    fields += [("created", format_time(order.created_at)), ("updated", format_time(order.updated_at))]
    items = items_table(order.items) if order.items else "no items"
    return f"{render_fields(fields)}\n\n{items}"


def summary_details(summary: queries_pb2.CustomerSummary) -> str:
    """A customer's order count by status, spend per currency, first and last order."""
    by_status = ", ".join(f"{status_name(s.status)} {s.count}" for s in summary.orders_by_status if s.count)
    spend = ", ".join(format_money(money) for money in summary.lifetime_spend) or "-"
    fields = [
        ("customer", summary.customer_id),
        ("orders", f"{summary.order_count}" + (f" ({by_status})" if by_status else "")),
        ("lifetime spend", spend),
        ("first order", format_time(summary.first_order_at)),
        ("last order", format_time(summary.last_order_at)),
    ]
    return render_fields(fields)


def order_line(order: types_pb2.Order) -> str:
    """One line per order version, for watch: "order-1 version 3: pending, 3 items, 3.60 EUR (12:00:03Z)"."""
    count = units(order)
    return (
        f"{order.order_id} version {order.version}: {status_name(order.status)}, "
        f"{count} item{'' if count == 1 else 's'}, {format_money(order.total)} ({format_time(order.updated_at)})"
    )


# Shown under each subcommand's --help.
EXAMPLES: dict[str, str] = {
    "create": """\
  orders create --customer alice --currency EUR
  orders create --customer alice --currency EUR --order-id order-1 \\
      --recipient "Ada Lovelace" --line1 "Main St 1" --city Berlin --postal-code 10115 --country DE
""",
    "add-item": """\
  orders add-item order-1 --sku SKU-1 --name Widget --quantity 3 --price 1.20
  orders add-item order-1 --sku SKU-2 --name Gadget --quantity 1 --price-minor 1999 --currency EUR
  orders add-item order-2 --sku TEA --name Tea --quantity 2 --price 300 --token 1759-3

Without --currency the order's currency is read from the read service; right after `create`,
pass the token it printed (--token) so that the lookup sees the new order.
The price is exact: 1.999 EUR is refused (EUR has 2 decimal places, JPY 0, KWD 3).
""",
    "remove-item": "  orders remove-item order-1 --sku SKU-1\n",
    "set-address": """\
  orders set-address order-1 --recipient "Ada Lovelace" --line1 "Main St 1" --city Berlin \\
      --postal-code 10115 --country DE
""",
    "confirm": "  orders confirm order-1\n  orders confirm order-1 --expected-version 3\n",
    "ship": "  orders ship order-1 --carrier DHL --tracking-number 00340434\n",
    "cancel": '  orders cancel order-1 --reason "customer asked"\n',
    "get": "  orders get order-1\n  orders get order-1 --token 1762-6 --json\n",
    "list": "  orders list\n  orders list --customer alice --status shipped --limit 0\n",
    "summary": "  orders summary alice\n",
    "watch": """\
  orders watch order-1
  orders watch --customer alice --json
  orders watch order-1 --timeout 60

The first line is the order (or the customer's newest orders) as it is now, then one line per change.
--timeout after `watch` is how long to watch; the --timeout before it does not limit a watch.
""",
}

"""`orders`: place, change and look at orders from a shell.

Commands go to OrderCommands (the write service, ORDERS_WRITE_ADDRESS):
    orders create --customer alice --currency EUR     a new order; prints its id, version and token
    orders add-item ORDER_ID --sku SKU --name NAME --quantity 3 --price 1.20
    orders remove-item ORDER_ID --sku SKU
    orders set-address ORDER_ID --recipient NAME --line1 STREET --city CITY --postal-code CODE --country DE
    orders confirm ORDER_ID
    orders ship ORDER_ID [--carrier DHL] [--tracking-number 00340434]
    orders cancel ORDER_ID [--reason TEXT]

Queries go to OrderQueries (the read service, ORDERS_READ_ADDRESS):
    orders get ORDER_ID                                the order and its items
    orders list [--customer ID] [--status shipped]     newest first, 20 at most (--limit)
    orders summary CUSTOMER_ID                         a customer's orders by status, and spend
    orders watch ORDER_ID | orders watch --customer ID each change as it happens, until Ctrl-C

Queries read views that follow the commands within moments. To read your own write at once,
pass the token that the command printed: `orders get ORDER_ID --token TOKEN`.

Services with TLS or token authentication (docs/security.md): --tls-ca-file (mutual TLS: also
--tls-cert-file and --tls-key-file) and --auth-token, or their variables (ORDERS_TLS_CA_FILE, ...).

Tables for people, --json for scripts (protobuf JSON, one document per result). The options
above the subcommands may also follow a subcommand. Exit status: 0 done, 1 refused or failed
call, 2 bad command line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message

from orders import config
from orders.cli import settings as client_settings
from orders.cli.format import (
    EXAMPLES,
    STATUS_NAMES,
    PriceError,
    order_details,
    order_line,
    orders_table,
    parse_price,
    status_value,
    summary_details,
)
from orders.client import (
    DEFAULT_TIMEOUT,
    DeadlineExceeded,
    NotFound,
    OrdersClient,
    OrdersRpcError,
    money,
    new_command_id,
)
from orders.v1 import commands_pb2, queries_pb2, types_pb2

PROG = "orders"
RAW = argparse.RawDescriptionHelpFormatter
JSON_HELP = "print protobuf JSON instead of text (one document per result; one per line for watch)"
ADDRESS_FIELDS = ("recipient", "line1", "line2", "city", "region", "postal_code", "country")
INTERRUPTED = 130
Handler = Callable[[OrdersClient, argparse.Namespace], Any]


class CliError(Exception):
    """A failure already described for people: the lines to print and the exit status."""

    def __init__(self, lines: Sequence[str], status: int = 1) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)
        self.status = status


# ---------------------------------------------------------------------------- output


def to_json(message: Message, indent: int | None = 2) -> str:
    return MessageToJson(message, preserving_proto_field_name=True, indent=indent)


def say(*lines: str) -> None:
    """Lines for people on stderr (errors, hints, notes), so that stdout stays the result."""
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def show_result(result: commands_pb2.CommandResult, done: str, args: argparse.Namespace) -> None:
    if args.json:
        print(to_json(result))
    else:
        print(f"order {result.order_id} {done}: version {result.version}, token {result.consistency_token}")


def note_if_stale(consistency: queries_pb2.ReadConsistency, args: argparse.Namespace) -> None:
    if consistency.stale:
        say(f"{PROG}: note: the views had not caught up with token {args.token} yet; recent changes may be missing")


def error_lines(error: OrdersRpcError, side: str, args: argparse.Namespace) -> list[str]:
    """The error in one line, one line per field violation, then hints for what to do."""
    reason = f" {error.reason}" if error.reason not in ("", error.code.name) else ""
    if error.field_violations:  # the message only joins the violations: list them instead
        lines = [f"{PROG}: {error.code.name}{reason}: invalid request"]
        lines += [f"  {violation.field}: {violation.description}" for violation in error.field_violations]
    else:
        lines = [f"{PROG}: {error.code.name}{reason}: {error.message}"]
    transport = error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not error.reason
    if transport:
        address = getattr(args, f"{side}_address")
        lines.append(
            f"{PROG}: is the {side} service running at {address}? Set its address with "
            f"--{side}-address or {config.env_name(f'{side}-address')}"
        )
    maybe_applied = error.code == grpc.StatusCode.DEADLINE_EXCEEDED or error.reason == "EVENT_STORE_UNAVAILABLE"
    if side == "write" and maybe_applied:
        lines.append(
            f"{PROG}: the command may or may not have been applied; run it again with "
            f"--command-id {args.command_id} to apply it at most once"
        )
    return lines


# ---------------------------------------------------------------------------- commands


def command_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"expected_version": args.expected_version, "command_id": args.command_id}


def address_from(args: argparse.Namespace) -> types_pb2.ShippingAddress | None:
    """The address given by the --recipient ... --country flags; None when none was given."""
    values = {name: getattr(args, name) for name in ADDRESS_FIELDS}
    if all(value is None for value in values.values()):
        return None
    values["country_code"] = values.pop("country")
    return types_pb2.ShippingAddress(**{name: value or "" for name, value in values.items()})


async def create(client: OrdersClient, args: argparse.Namespace) -> None:
    result = await client.create_order(
        args.customer,
        args.currency,
        order_id=args.order_id,
        shipping_address=address_from(args),
        **command_options(args),
    )
    show_result(result, "created", args)


async def order_currency(client: OrdersClient, args: argparse.Namespace) -> str:
    """The currency of the order, from the read views (waiting for --token, if given)."""
    try:
        reply = await client.get_order(args.order_id, consistency_token=args.token)
    except OrdersRpcError as error:
        lines = [f"{PROG}: looking up the currency of order {args.order_id}:", *error_lines(error, "read", args)]
        if isinstance(error, NotFound):
            lines.append(f"{PROG}: for an order just created, pass --currency, or --token with the token it printed")
        raise CliError(lines) from error
    return reply.order.total.currency_code


async def add_item(client: OrdersClient, args: argparse.Namespace) -> None:
    currency = args.currency or await order_currency(client, args)
    try:
        minor_units = args.price_minor if args.price is None else parse_price(args.price, currency)
    except PriceError as error:
        raise CliError([f"{PROG} add-item: error: --price: {error}"], status=2) from error
    unit_price = money(minor_units, currency)
    result = await client.add_item(
        args.order_id, args.sku, args.name, args.quantity, unit_price, **command_options(args)
    )
    show_result(result, "item added", args)


async def remove_item(client: OrdersClient, args: argparse.Namespace) -> None:
    show_result(await client.remove_item(args.order_id, args.sku, **command_options(args)), "item removed", args)


async def set_address(client: OrdersClient, args: argparse.Namespace) -> None:
    address = address_from(args)
    assert address is not None  # the flags are required
    result = await client.change_shipping_address(args.order_id, address, **command_options(args))
    show_result(result, "address set", args)


async def confirm(client: OrdersClient, args: argparse.Namespace) -> None:
    show_result(await client.confirm_order(args.order_id, **command_options(args)), "confirmed", args)


async def ship(client: OrdersClient, args: argparse.Namespace) -> None:
    result = await client.ship_order(
        args.order_id, carrier=args.carrier, tracking_number=args.tracking_number, **command_options(args)
    )
    show_result(result, "shipped", args)


async def cancel(client: OrdersClient, args: argparse.Namespace) -> None:
    show_result(
        await client.cancel_order(args.order_id, reason=args.reason, **command_options(args)), "cancelled", args
    )


# ---------------------------------------------------------------------------- queries


async def get(client: OrdersClient, args: argparse.Namespace) -> None:
    reply = await client.get_order(args.order_id, consistency_token=args.token)
    note_if_stale(reply.consistency, args)
    print(to_json(reply) if args.json else order_details(reply.order))


async def list_orders(client: OrdersClient, args: argparse.Namespace) -> None:
    """Up to --limit orders, page by page; one more is read to tell whether more follow."""
    limit, found = args.limit, []
    status = status_value(args.status) if args.status else types_pb2.ORDER_STATUS_UNSPECIFIED
    page_size = min(limit + 1, 500) if limit else 500
    orders = client.iter_orders(
        customer_id=args.customer, status=status, page_size=page_size, consistency_token=args.token
    )
    async for order in orders:
        found.append(order)
        if limit and len(found) > limit:
            break
    shown = found[:limit] if limit else found
    if args.json:
        print(to_json(queries_pb2.ListOrdersResponse(orders=shown)))
        return
    print(orders_table(shown) if shown else "no orders")
    if len(found) > len(shown):
        say(f"{PROG}: more orders match than the {limit} shown; --limit N shows N, --limit 0 all")


async def summary(client: OrdersClient, args: argparse.Namespace) -> None:
    reply = await client.get_customer_summary(args.customer_id, consistency_token=args.token)
    note_if_stale(reply.consistency, args)
    print(to_json(reply) if args.json else summary_details(reply.summary))


async def watch(client: OrdersClient, args: argparse.Namespace) -> None:
    """Each version as the read service sends it, until --timeout (the stream then ends with OK)."""
    if (args.order_id is None) == (args.customer is None):
        raise CliError([f"{PROG} watch: error: give either ORDER_ID or --customer ID (see --help)"], status=2)
    options: dict[str, Any] = {"consistency_token": args.token, "timeout": args.watch_timeout}
    try:
        if args.customer is None:
            async for reply in client.watch_order(args.order_id, **options):
                note_if_stale(reply.consistency, args)
                print(to_json(reply, indent=None) if args.json else order_line(reply.order), flush=True)
        else:
            async for update in client.watch_customer_orders(args.customer, **options):
                show_customer_update(update, args)
    except DeadlineExceeded:
        if args.watch_timeout is None:
            raise
        # --timeout is up; the server normally ends the stream just before, with OK


def show_customer_update(update: queries_pb2.WatchCustomerOrdersResponse, args: argparse.Namespace) -> None:
    if args.json:
        print(to_json(update, indent=None), flush=True)
        return
    for order in update.orders:
        print(order_line(order), flush=True)
    if update.initial and not update.orders:
        say(f"{PROG}: customer {args.customer} has no orders yet; waiting for changes")
    if update.truncated:
        say(f"{PROG}: only the newest {len(update.orders)} orders shown; changes to any order follow")


# ---------------------------------------------------------------------------- command line


def checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A type for argparse whose ValueError message is shown as it is."""

    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    wrapped.__name__ = parse.__name__
    return wrapped


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {text!r}")
    return value


def add_global_options(parser: argparse.ArgumentParser, *, timeout: bool = True) -> None:
    """The top-level options again, after the subcommand; they override the ones before it."""
    hidden = argparse.SUPPRESS
    parser.add_argument("--json", action="store_true", default=hidden, help=JSON_HELP)
    parser.add_argument("--write-address", type=checked(config.address), default=hidden, help=hidden)
    parser.add_argument("--read-address", type=checked(config.address), default=hidden, help=hidden)
    for flag in ("tls-ca-file", "tls-server-name", "auth-token"):
        parser.add_argument(f"--{flag}", default=hidden, help=hidden)
    for flag in ("tls-cert-file", "tls-key-file"):
        parser.add_argument(f"--{flag}", type=config.optional_path, default=hidden, help=hidden)
    if timeout:
        parser.add_argument("--timeout", type=checked(config.positive_float), default=hidden, help=hidden)


def subcommand(commands: Any, name: str, text: str, handler: Handler, *, side: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=text, description=text, epilog="examples:\n" + EXAMPLES[name], formatter_class=RAW
    )
    parser.set_defaults(handler=handler, side=side)
    add_global_options(parser, timeout=name != "watch")
    return parser


def command(commands: Any, name: str, text: str, handler: Handler) -> argparse.ArgumentParser:
    """A subcommand of OrderCommands: ORDER_ID unless it creates, and the concurrency options."""
    parser = subcommand(commands, name, text, handler, side="write")
    if name != "create":
        parser.add_argument("order_id", metavar="ORDER_ID")
    parser.add_argument(
        "--expected-version", type=int, metavar="N", help="refuse (ABORTED) unless the order is at version N"
    )
    parser.add_argument(
        "--command-id", metavar="ID", help="idempotency key: a repeat with the same id is applied once (default: new)"
    )
    return parser


def add_address_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("shipping address" + ("" if required else " (optional)"))
    for name, text in (
        ("recipient", "name of the recipient"),
        ("line1", "street and number"),
        ("line2", "more of the address (optional)"),
        ("city", "city"),
        ("region", "state or region (optional)"),
        ("postal-code", "postal code"),
        ("country", "ISO 3166-1 alpha-2 country code, e.g. DE"),
    ):
        needed = required and name not in ("line2", "region")
        group.add_argument(f"--{name}", required=needed, type=str.upper if name == "country" else str, help=text)


def add_command_parsers(commands: Any) -> None:
    parser = command(commands, "create", "create an order (status pending)", create)
    parser.add_argument("--customer", required=True, metavar="ID", help="customer id")
    parser.add_argument("--currency", required=True, type=str.upper, help="ISO 4217 currency code, e.g. EUR")
    parser.add_argument("--order-id", default="", metavar="ID", help="the new order's id (default: generated)")
    add_address_options(parser, required=False)

    parser = command(commands, "add-item", "add units of a product to a pending order", add_item)
    parser.add_argument("--sku", required=True, help="product code")
    parser.add_argument("--name", required=True, help="product name")
    parser.add_argument("--quantity", required=True, type=int, metavar="N", help="units to add (1-10000)")
    price = parser.add_mutually_exclusive_group(required=True)
    price.add_argument("--price", metavar="AMOUNT", help="unit price in major units, e.g. 1.99 (exactly)")
    price.add_argument("--price-minor", type=non_negative_int, metavar="N", help="unit price in minor units: 199")
    parser.add_argument(
        "--currency", type=str.upper, help="the order's currency (default: read from the order, see --token)"
    )
    parser.add_argument("--token", help="a command's token: read the order's currency from views that include it")

    parser = command(commands, "remove-item", "remove a product's line from a pending order", remove_item)
    parser.add_argument("--sku", required=True, help="product code")
    add_address_options(command(commands, "set-address", "set the shipping address", set_address), True)
    command(commands, "confirm", "confirm a pending order that has items", confirm)
    parser = command(commands, "ship", "ship a confirmed order that has an address", ship)
    parser.add_argument("--carrier", default="", help="e.g. DHL")
    parser.add_argument("--tracking-number", default="", metavar="NUMBER", help="the carrier's tracking number")
    parser = command(commands, "cancel", "cancel a pending or confirmed order", cancel)
    parser.add_argument("--reason", default="", help="why, for the record")


def add_token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help="a command's token: wait until the views include that command")


def add_query_parsers(commands: Any) -> None:
    parser = subcommand(commands, "get", "show an order and its items", get, side="read")
    parser.add_argument("order_id", metavar="ORDER_ID")
    add_token(parser)
    parser = subcommand(commands, "list", "list orders, newest first", list_orders, side="read")
    parser.add_argument("--customer", default="", metavar="ID", help="only this customer's orders")
    parser.add_argument("--status", choices=STATUS_NAMES, help="only orders in this status")
    parser.add_argument(
        "--limit", type=checked(non_negative_int), default=20, metavar="N", help="show N orders at most (0: all)"
    )
    add_token(parser)
    parser = subcommand(commands, "summary", "show a customer's order statistics", summary, side="read")
    parser.add_argument("customer_id", metavar="CUSTOMER_ID")
    add_token(parser)
    parser = subcommand(commands, "watch", "print an order's (or customer's) changes", watch, side="read")
    parser.add_argument("order_id", metavar="ORDER_ID", nargs="?", help="the order to watch")
    parser.add_argument("--customer", metavar="ID", help="watch every order of this customer instead")
    parser.add_argument(
        "--timeout", dest="watch_timeout", type=checked(config.positive_float), metavar="SECONDS",
        help="stop watching after SECONDS (default: until Ctrl-C)",
    )  # fmt: skip
    add_token(parser)


def build_parser() -> config.SettingsParser:
    parser = config.SettingsParser(prog=PROG, description=__doc__, formatter_class=RAW)
    for side, default in (("write", config.DEFAULT_WRITE_ADDRESS), ("read", config.DEFAULT_READ_ADDRESS)):
        service = "OrderCommands" if side == "write" else "OrderQueries"
        config.add_setting(
            parser,
            f"{side}-address",
            f"HOST:PORT of {service} (the {side} service)",
            default=default,
            parse=config.address,
        )
    config.add_setting(
        parser, "timeout", "seconds each call may take", default=str(DEFAULT_TIMEOUT), parse=config.positive_float
    )
    client_settings.add_client_security_arguments(parser)
    config.add_log_argument(parser)  # checked as the services check it, though only libraries log here
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_command_parsers(commands)
    add_query_parsers(commands)
    return parser


async def run(args: argparse.Namespace) -> int:
    if args.side == "write" and args.command_id is None:
        args.command_id = new_command_id()  # made here so that an error can name it
    client = OrdersClient(
        args.write_address, args.read_address, timeout=args.timeout, tls=args.tls, token=args.auth_token or None
    )
    async with client:
        try:
            await args.handler(client, args)
        except OrdersRpcError as error:
            say(*error_lines(error, args.side, args))
            return 1
        except CliError as error:
            say(*error.lines)
            return error.status
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config.setup_logging(args.log_level, args.log_format)
    try:
        status = asyncio.run(run(args))
    except KeyboardInterrupt:
        status = INTERRUPTED
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()

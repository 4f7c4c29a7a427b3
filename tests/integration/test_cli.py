"""The `orders` command line against the real services: each call is a separate process, as a
person's would be, that finds the services through ORDERS_WRITE_ADDRESS and ORDERS_READ_ADDRESS."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from typing import Any

import grpc
import pytest

from orders.tools.processes import child_environment, script_command
from orders.v1 import commands_pb2
from tests.helpers import Ran, money, run_to_end
from tests.integration.conftest import System

RESULT = re.compile(r"order (?P<order_id>\S+) (?P<done>[a-z ]+): version (?P<version>\d+), token (?P<token>\d+-\d+)")
SUBCOMMANDS = (
    "create",
    "add-item",
    "remove-item",
    "set-address",
    "confirm",
    "ship",
    "cancel",
    "get",
    "list",
    "summary",
    "watch",
)
ADDRESS = ("--recipient", "Ada Lovelace", "--line1", "Main St 1", "--city", "Berlin", "--postal-code", "10115")
INTERRUPTED = 130


def environment(write_address: str, read_address: str) -> dict[str, str]:
    """The test's environment without ORDERS_* settings, plus the services' two address settings."""
    return child_environment({"ORDERS_WRITE_ADDRESS": write_address, "ORDERS_READ_ADDRESS": read_address})


def system_env(system: System) -> dict[str, str]:
    return environment(f"127.0.0.1:{system.write_port}", f"127.0.0.1:{system.read_port}")


async def start(env: dict[str, str], *argv: str) -> asyncio.subprocess.Process:
    """Starts `orders ARGV...`, for a test that reads its output as it comes (a watch)."""
    return await asyncio.create_subprocess_exec(
        *script_command("orders", *argv),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> Ran:
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def orders(env: dict[str, str], *argv: str) -> Ran:
    """Runs `orders ARGV...` to its end."""
    return await run_to_end(script_command("orders", *argv), env)


async def command(env: dict[str, str], *argv: str) -> dict[str, str]:
    """Runs a command that must succeed, and returns the fields of its one-line result."""
    ran = await orders(env, *argv)
    assert (ran.status, ran.err) == (0, "")
    match = RESULT.fullmatch(ran.out.strip())
    assert match is not None, ran.out
    return match.groupdict()


def free_port() -> int:
    """A port that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_lifecycle_with_decimal_price_then_read_your_writes(system: System) -> None:
    """create, add-item at 1.20 EUR x 3, set-address, confirm and ship each print a result line; `get` with
    the last token shows the shipped order at version 5 with 3.60 EUR (360 minor units)."""
    env = system_env(system)
    created = await command(env, "create", "--customer", "alice", "--currency", "eur", "--order-id", "order-1")
    # No --currency: the CLI reads it from the order, in views that include the create (its token).
    added = await command(
        env, "add-item", "order-1", "--sku", "SKU-1", "--name", "Widget", "--quantity", "3", "--price", "1.20",
        "--token", created["token"],
    )  # fmt: skip
    addressed = await command(env, "set-address", "order-1", *ADDRESS, "--country", "de")
    confirmed = await command(env, "confirm", "order-1", "--expected-version", "3")
    shipped = await command(env, "ship", "order-1", "--carrier", "DHL", "--tracking-number", "00340434")
    results = [created, added, addressed, confirmed, shipped]

    got = await orders(env, "get", "order-1", "--token", shipped["token"], "--json")
    shown = await orders(env, "get", "order-1", "--token", shipped["token"])

    assert [(r["order_id"], r["done"], r["version"]) for r in results] == [
        ("order-1", "created", "1"),
        ("order-1", "item added", "2"),
        ("order-1", "address set", "3"),
        ("order-1", "confirmed", "4"),
        ("order-1", "shipped", "5"),
    ]
    assert (got.status, got.err) == (0, "")
    order = json.loads(got.out)["order"]
    assert (order["status"], order["version"], order["total"]) == (
        "ORDER_STATUS_SHIPPED",
        "5",
        {"currency_code": "EUR", "minor_units": "360"},
    )
    assert order["items"] == [
        {
            "sku": "SKU-1",
            "name": "Widget",
            "quantity": 3,
            "unit_price": {"currency_code": "EUR", "minor_units": "120"},
            "line_total": {"currency_code": "EUR", "minor_units": "360"},
        }
    ]
    lines = shown.out.splitlines()
    assert (shown.status, lines[2:7], lines[-2:]) == (
        0,
        [
            "status      shipped",
            "version     5",
            "total       3.60 EUR",
            "ship to     Ada Lovelace, Main St 1, 10115 Berlin, DE",
            "shipped by  DHL, tracking number 00340434",
        ],
        ["SKU    NAME    QTY  UNIT PRICE  LINE TOTAL", "SKU-1  Widget    3    1.20 EUR    3.60 EUR"],
    )


async def test_list_shows_the_customers_orders_as_a_table(system: System) -> None:
    """`list --customer` shows a row per order of the customer, newest first; --status filters; --limit cuts."""
    env = system_env(system)
    await command(env, "create", "--customer", "bob", "--currency", "EUR", "--order-id", "b-1")
    await command(env, "create", "--customer", "carol", "--currency", "EUR", "--order-id", "c-1")
    last = await command(
        env, "add-item", "b-1", "--sku", "S", "--name", "Pen", "--quantity", "2", "--price-minor", "620",
        "--currency", "EUR",
    )  # fmt: skip
    token = ("--token", last["token"])

    listed = await orders(env, "list", "--customer", "bob", *token)
    pending = await orders(env, "list", "--status", "pending", *token)
    shipped = await orders(env, "list", "--status", "shipped", *token)
    limited = await orders(env, "list", "--limit", "1", *token)

    def rows(ran: Ran) -> list[list[str]]:
        assert ran.status == 0
        return [line.split()[:6] for line in ran.out.splitlines()]

    assert rows(listed) == [
        ["ORDER", "CUSTOMER", "STATUS", "ITEMS", "TOTAL", "UPDATED"],
        ["b-1", "bob", "pending", "2", "12.40", "EUR"],
    ]
    assert [row[0] for row in rows(pending)] == ["ORDER", "c-1", "b-1"]  # newest created first
    assert (shipped.out, [row[0] for row in rows(limited)]) == ("no orders\n", ["ORDER", "c-1"])
    assert limited.err == "orders: more orders match than the 1 shown; --limit N shows N, --limit 0 all\n"


async def test_json_output_parses_before_and_after_the_subcommand(system: System) -> None:
    """--json, given before or after the subcommand, prints protobuf JSON that parses."""
    env = system_env(system)
    before = await orders(env, "--json", "create", "--customer", "dave", "--currency", "JPY", "--order-id", "d-1")
    after = await orders(env, "create", "--customer", "dave", "--currency", "JPY", "--order-id", "d-2", "--json")
    token = json.loads(after.out)["consistency_token"]
    listed = await orders(env, "list", "--customer", "dave", "--token", token, "--json")
    summary = await orders(env, "summary", "dave", "--token", token, "--json")

    assert [(ran.status, ran.err) for ran in (before, after, listed, summary)] == [(0, "")] * 4
    assert [json.loads(ran.out)["order_id"] for ran in (before, after)] == ["d-1", "d-2"]
    assert [order["order_id"] for order in json.loads(listed.out)["orders"]] == ["d-2", "d-1"]
    assert json.loads(summary.out)["summary"]["order_count"] == "2"


async def test_business_rule_error_exits_1_with_code_and_reason(system: System) -> None:
    """Confirming an empty order fails with status 1 and one line naming FAILED_PRECONDITION and ORDER_EMPTY."""
    env = system_env(system)
    await command(env, "create", "--customer", "erin", "--currency", "EUR", "--order-id", "e-1")

    ran = await orders(env, "confirm", "e-1")

    assert (ran.status, ran.out, ran.err) == (
        1,
        "",
        "orders: FAILED_PRECONDITION ORDER_EMPTY: cannot confirm order 'e-1': it has no items\n",
    )


async def test_bad_input_shows_each_field_violation(system: System) -> None:
    """Quantity 0 is refused by the server with INVALID_ARGUMENT; the field violation gets its own line."""
    env = system_env(system)
    await command(env, "create", "--customer", "finn", "--currency", "EUR", "--order-id", "f-1")

    ran = await orders(
        env, "add-item", "f-1", "--sku", "S", "--name", "N", "--quantity", "0", "--price", "1", "--currency", "EUR"
    )

    assert (ran.status, ran.err.splitlines()) == (
        1,
        ["orders: INVALID_ARGUMENT: invalid request", "  quantity: must be 1-10000, got 0"],
    )


async def test_price_finer_than_the_currency_is_a_usage_error(system: System) -> None:
    """1.999 EUR is refused before any command is sent (status 2), and the order stays unchanged."""
    env = system_env(system)
    created = await command(env, "create", "--customer", "gus", "--currency", "EUR", "--order-id", "g-1")
    argv = ("add-item", "g-1", "--sku", "S", "--name", "N", "--quantity", "1", "--price")

    finer = await orders(env, *argv, "1.999", "--token", created["token"])
    negative = await orders(env, *argv, "-1", "--currency", "EUR")
    got = await orders(env, "get", "g-1", "--token", created["token"], "--json")

    assert (finer.status, finer.err) == (
        2,
        "orders add-item: error: --price: price 1.999 has 3 decimal places, but EUR has 2; "
        "give a price such as 1.99 or use --price-minor\n",
    )
    assert (negative.status, negative.err) == (
        2,
        "orders add-item: error: --price: price -1 is negative; a price is 0 or more\n",
    )
    assert json.loads(got.out)["order"]["version"] == "1"


async def test_unreachable_service_gives_a_hint() -> None:
    """With nothing at the addresses, a command and a query each fail with status 1 and a hint naming
    the address and its setting."""
    port = free_port()
    env = environment(f"127.0.0.1:{port}", f"127.0.0.1:{port}")

    write, read = await asyncio.gather(
        orders(env, "--timeout", "2", "confirm", "o-1"), orders(env, "get", "o-1", "--timeout", "2")
    )

    assert (write.status, write.err.splitlines()[-1]) == (
        1,
        f"orders: is the write service running at 127.0.0.1:{port}? Set its address with --write-address or "
        "ORDERS_WRITE_ADDRESS",
    )
    assert (read.status, read.err.splitlines()[-1]) == (
        1,
        f"orders: is the read service running at 127.0.0.1:{port}? Set its address with --read-address or "
        "ORDERS_READ_ADDRESS",
    )


async def test_timeout_is_the_deadline_of_each_call() -> None:
    """`--timeout 3` is the deadline a command and a query carry (the service sees at most 3 s left,
    not the default 10 s); a service that never answers ends them with DEADLINE_EXCEEDED, the hint,
    and for the command the note that it may or may not have been applied."""
    time_left: list[tuple[str, float | None]] = []  # (method, seconds left) as each call arrived

    def never_answering(method: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        async def hold(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            time_left.append((method, context.time_remaining()))
            await asyncio.Event().wait()  # until the caller's deadline cancels the call
            raise AssertionError("the call outlived its deadline")

        return grpc.unary_unary_rpc_method_handler(hold)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "orders.v1.OrderCommands", {"ConfirmOrder": never_answering("confirm")}
            ),
            grpc.method_handlers_generic_handler("orders.v1.OrderQueries", {"GetOrder": never_answering("get")}),
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = environment(f"127.0.0.1:{port}", f"127.0.0.1:{port}")
        write, read = await asyncio.gather(
            orders(env, "--timeout", "3", "confirm", "o-1"), orders(env, "get", "o-1", "--timeout", "3")
        )
    finally:
        await server.stop(0)

    assert {method for method, _ in time_left} == {"confirm", "get"}
    assert all(left is not None and left <= 3 for _, left in time_left), time_left
    assert (write.status, write.err.splitlines()[:2]) == (
        1,
        [
            "orders: DEADLINE_EXCEEDED: Deadline Exceeded",
            f"orders: is the write service running at 127.0.0.1:{port}? Set its address with --write-address or "
            "ORDERS_WRITE_ADDRESS",
        ],
    )
    assert "the command may or may not have been applied" in write.err.splitlines()[-1]
    assert (read.status, read.err.splitlines()) == (
        1,
        [
            "orders: DEADLINE_EXCEEDED: Deadline Exceeded",
            f"orders: is the read service running at 127.0.0.1:{port}? Set its address with --read-address or "
            "ORDERS_READ_ADDRESS",
        ],
    )


async def next_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    return (await asyncio.wait_for(process.stdout.readline(), 30)).decode()


async def test_watch_prints_the_order_now_then_each_new_version(system: System) -> None:
    """`watch ORDER_ID --timeout 3 --json` prints the order as it is, then the version an add-item made, one
    JSON document per line, and ends with status 0 when the time is up."""
    env = system_env(system)
    created = await command(env, "create", "--customer", "hana", "--currency", "EUR", "--order-id", "h-1")
    watching = await start(env, "watch", "h-1", "--timeout", "3", "--json", "--token", created["token"])
    first = await next_line(watching)

    await system.commands.AddItem(
        commands_pb2.AddItemRequest(order_id="h-1", sku="S", name="Soap", quantity=1, unit_price=money(250))
    )
    rest = await finish(watching)

    replies: list[dict[str, Any]] = [json.loads(line) for line in [first, *rest.out.splitlines()]]
    assert [(reply["order"]["version"], len(reply["order"].get("items", []))) for reply in replies] == [
        ("1", 0),
        ("2", 1),
    ]
    assert (rest.status, rest.err) == (0, "")


async def test_watch_customer_prints_a_line_per_order_version(system: System) -> None:
    """`watch --customer` prints the customer's orders as they are, then each changed one, as text lines."""
    env = system_env(system)
    created = await command(env, "create", "--customer", "ivan", "--currency", "EUR", "--order-id", "i-1")
    watching = await start(env, "watch", "--customer", "ivan", "--timeout", "3", "--token", created["token"])
    first = await next_line(watching)

    await system.commands.AddItem(
        commands_pb2.AddItemRequest(order_id="i-1", sku="S", name="Soap", quantity=2, unit_price=money(250))
    )
    rest = await finish(watching)

    versions = [line.split(":")[0] for line in [first, *rest.out.splitlines()]]
    assert (versions, rest.out.split(": ", 1)[1].split(" (")[0], rest.status) == (
        ["i-1 version 1", "i-1 version 2"],
        "pending, 2 items, 5.00 EUR",
        0,
    )


async def test_ctrl_c_ends_a_watch_quietly_with_130(system: System) -> None:
    """SIGINT (Ctrl-C) during a watch ends it with status 130 and nothing on stderr."""
    env = system_env(system)
    created = await command(env, "create", "--customer", "jo", "--currency", "EUR", "--order-id", "j-1")
    watching = await start(env, "watch", "j-1", "--token", created["token"])
    first = await next_line(watching)

    watching.send_signal(signal.SIGINT)
    rest = await finish(watching)

    assert (first.split(":")[0], rest.status, rest.out, rest.err) == ("j-1 version 1", INTERRUPTED, "", "")


@pytest.mark.parametrize("name", SUBCOMMANDS)
async def test_each_subcommand_has_help_with_examples(name: str) -> None:
    """`orders SUBCOMMAND --help` exits 0 and shows its usage and examples."""
    ran = await orders(environment("127.0.0.1:1", "127.0.0.1:1"), name, "--help")

    assert (ran.status, ran.out.startswith(f"usage: orders {name} "), "examples:\n  orders " + name in ran.out) == (
        0,
        True,
        True,
    )


async def test_top_level_help_lists_every_subcommand_and_the_settings() -> None:
    """`orders --help` lists each subcommand and the ORDERS_* settings the services read."""
    ran = await orders(environment("127.0.0.1:1", "127.0.0.1:1"), "--help")

    listed = {line.split()[0] for line in ran.out.splitlines() if line.startswith("    ") and line.split()}
    assert (ran.status, set(SUBCOMMANDS) <= listed) == (0, True)
    assert [setting in ran.out for setting in ("ORDERS_WRITE_ADDRESS", "ORDERS_READ_ADDRESS", "ORDERS_TIMEOUT")] == [
        True
    ] * 3

"""TLS, mutual TLS and token authentication of the real servers (docs/security.md).

The secured servers run in the test's event loop next to the `system` fixture's plaintext ones and
share its PostgreSQL database, Redis keys and sync worker. Their ServerSecurity comes from the
services' own settings (write_service.main.parse_settings), so the settings are tested too.
Certificates are made by `trustme`: one CA for the servers and the good clients, another one
that nobody trusts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orders.client import (
    NO_RETRIES,
    OrdersClient,
    PermissionDenied,
    TlsConfig,
    Unauthenticated,
    Unavailable,
    bearer_metadata,
    money,
)
from orders.server.grpc_server import RunningServer, start_server
from orders.server.security import ServerSecurity, token_sha256
from orders.store.event_store import connect
from orders.telemetry.logs import current_caller
from orders.tools.processes import child_environment, script_command
from orders.v1 import admin_pb2, admin_pb2_grpc, commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from read_service.main import ReadService, start_read_service
from read_service.servicer import SERVICE as QUERIES
from sync_worker.main import start_admin
from tests.helpers import create_request, error_reason, rich_details, run_to_end
from tests.integration.conftest import System
from write_service.main import parse_settings, start_write_service

SHOP_TOKEN = "shop-0123456789abcdef"  # commands and queries
READER_TOKEN = "reader-0123456789abcdef"  # queries only
OPS_TOKEN = "ops-0123456789abcdef"  # admin only
DEV_TOKEN = "dev-0123456789abcdef"  # stored as `token` (development only), commands and queries
NOBODYS_TOKEN = "nobody-0123456789abcdef"
TOKENS_TOML = f"""
[callers.shop]
token_sha256 = "{token_sha256(SHOP_TOKEN)}"
scopes = ["commands", "queries"]

[callers.reader]
token_sha256 = "{token_sha256(READER_TOKEN).upper()}"
scopes = ["queries"]

[callers.ops]
token_sha256 = "{token_sha256(OPS_TOKEN)}"
scopes = ["admin"]

[callers.dev]
token = "{DEV_TOKEN}"
scopes = ["commands", "queries"]
"""


# ---------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Pki:
    ca: Path  # signs the servers' certificates and the good client's
    cert: Path  # the servers' certificate chain: 127.0.0.1 and localhost
    key: Path
    other_ca: Path  # trusted by nobody
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate that other_ca signed
    stranger_key: Path
    tokens: Path


def write_cert(cert: trustme.LeafCert, cert_path: Path, key_path: Path) -> None:
    cert.private_key_pem.write_to_path(str(key_path))
    for index, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(cert_path), append=index > 0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(root / "other-ca.pem"))
    write_cert(ca.issue_cert("127.0.0.1", "localhost"), root / "server.pem", root / "server.key")
    write_cert(ca.issue_cert("shop@example.org"), root / "client.pem", root / "client.key")
    write_cert(other_ca.issue_cert("shop@example.org"), root / "stranger.pem", root / "stranger.key")
    (root / "tokens.toml").write_text(TOKENS_TOML)
    return Pki(
        root / "ca.pem",
        root / "server.pem",
        root / "server.key",
        root / "other-ca.pem",
        root / "client.pem",
        root / "client.key",
        root / "stranger.pem",
        root / "stranger.key",
        root / "tokens.toml",
    )


def security_from(*argv: str) -> ServerSecurity:
    """The ServerSecurity that a service started with these settings uses."""
    settings = parse_settings(["--postgres-url", "postgresql://unused/unused", *argv])
    assert settings.security is not None
    return settings.security


def tls_settings(pki: Pki) -> list[str]:
    return ["--tls-cert-file", str(pki.cert), "--tls-key-file", str(pki.key)]


def mtls_settings(pki: Pki) -> list[str]:
    return [*tls_settings(pki), "--tls-client-ca-file", str(pki.ca)]


def token_settings(pki: Pki, *more: str) -> list[str]:
    return ["--auth-tokens-file", str(pki.tokens), *more]


@dataclass
class Secured:
    write: RunningServer
    read: ReadService

    @property
    def write_address(self) -> str:
        return f"127.0.0.1:{self.write.port}"

    @property
    def read_address(self) -> str:
        return f"127.0.0.1:{self.read.server.port}"

    def client(self, **options: Any) -> OrdersClient:
        return OrdersClient(self.write_address, self.read_address, retry=NO_RETRIES, timeout=5, **options)


StartSecured = Callable[[ServerSecurity], Awaitable[Secured]]


@pytest.fixture
async def start_secured(system: System) -> AsyncIterator[StartSecured]:
    """Starts a write and a read service with the given security, on the system's stores."""
    started: list[Secured] = []

    async def start(security: ServerSecurity) -> Secured:
        write = await start_write_service(system.pool, "127.0.0.1:0", security=security)
        read = await start_read_service(system.redis, system.keys, "127.0.0.1:0", security=security)
        started.append(Secured(write, read))
        return started[-1]

    yield start
    for secured in started:
        await secured.write.stop(0)
        await secured.read.stop(0)


async def event_count(system: System) -> int:
    count = await system.pool.fetchval("SELECT count(*) FROM events")
    assert isinstance(count, int)
    return count


def tls_channel(address: str, tls: TlsConfig) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, tls.credentials())


async def health_check(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def list_services(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    """The services that reflection names (a bidirectional stream)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5, metadata=metadata
    )
    async for reply in call:
        return {service.name for service in reply.list_services_response.service}
    raise AssertionError("reflection sent no reply")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = rich_details(error)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


# ---------------------------------------------------------------------------- TLS


async def test_tls_serves_a_client_that_trusts_the_servers_ca(start_secured: StartSecured, pki: Pki) -> None:
    """With the right CA, OrdersClient and a raw channel reach both services over TLS, by IP
    address or by host name."""
    secured = await start_secured(security_from(*tls_settings(pki)))

    async with secured.client(tls=TlsConfig(ca_file=pki.ca)) as client:
        session = client.session()
        created = await session.create_order("tls-alice", "EUR")
        reply = await session.get_order(created.order_id)
    async with tls_channel(f"localhost:{secured.write.port}", TlsConfig(ca_file=pki.ca)) as channel:
        await health_check(channel)

    assert reply.order.customer_id == "tls-alice"


async def test_tls_refuses_a_client_that_trusts_another_ca(start_secured: StartSecured, pki: Pki) -> None:
    """A client that does not trust the server's CA fails the handshake: UNAVAILABLE, nothing sent."""
    secured = await start_secured(security_from(*tls_settings(pki)))

    async with secured.client(tls=TlsConfig(ca_file=pki.other_ca)) as client:
        with pytest.raises(Unavailable):
            await client.create_order("tls-bob", "EUR")
    async with tls_channel(secured.read_address, TlsConfig(ca_file=pki.other_ca)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_check(channel)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_refuses_a_plaintext_client(system: System, start_secured: StartSecured, pki: Pki) -> None:
    """A TLS port does not speak plaintext gRPC."""
    secured = await start_secured(security_from(*tls_settings(pki)))
    before = await event_count(system)

    async with secured.client() as client:
        with pytest.raises(Unavailable):
            await client.create_order("plain-carol", "EUR")
    async with grpc.aio.insecure_channel(secured.write_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_check(channel)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await event_count(system) == before


async def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(start_secured: StartSecured, pki: Pki) -> None:
    """With --tls-client-ca-file, a client without a certificate and one whose certificate another CA
    signed are refused in the handshake; the client with a certificate from that CA is served."""
    secured = await start_secured(security_from(*mtls_settings(pki)))
    without = TlsConfig(ca_file=pki.ca)
    stranger = TlsConfig(ca_file=pki.ca, cert_file=pki.stranger_cert, key_file=pki.stranger_key)
    good = TlsConfig(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)

    refused = []
    for tls in (without, stranger):
        async with secured.client(tls=tls) as client:
            with pytest.raises(Unavailable) as caught:
                await client.create_order("mtls-dave", "EUR")
            refused.append(caught.value.code)
        async with tls_channel(secured.read_address, tls) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await health_check(channel)
            refused.append(raw.value.code())
    async with secured.client(tls=good) as client:
        created = await client.create_order("mtls-dave", "EUR")
        listed = await client.list_orders(customer_id="mtls-dave", consistency_token=created.consistency_token)

    assert refused == [grpc.StatusCode.UNAVAILABLE] * 4
    assert [order.order_id for order in listed.orders] == [created.order_id]


# ---------------------------------------------------------------------------- tokens


async def test_a_call_without_a_token_is_unauthenticated(system: System, start_secured: StartSecured, pki: Pki) -> None:
    """No authorization metadata (or not a Bearer one): UNAUTHENTICATED, reason MISSING_CREDENTIALS,
    for a unary command, a unary query and a WatchOrder stream; nothing is appended."""
    secured = await start_secured(security_from(*token_settings(pki)))
    before = await event_count(system)

    async with secured.client() as client:
        with pytest.raises(Unauthenticated) as command:
            await client.create_order("no-token", "EUR")
        with pytest.raises(Unauthenticated) as query:
            await client.get_order("order-1")
        with pytest.raises(Unauthenticated) as watch:
            await anext(client.watch_order("order-1", timeout=5))
    async with secured.client(metadata=[("authorization", f"Basic {SHOP_TOKEN}")]) as client:
        with pytest.raises(Unauthenticated) as basic:
            await client.create_order("no-token", "EUR")

    errors = [command.value, query.value, watch.value, basic.value]
    assert [(e.reason, e.domain) for e in errors] == [("MISSING_CREDENTIALS", "orders.v1")] * 4
    assert "authorization: Bearer" in command.value.message
    assert await event_count(system) == before


async def test_an_unknown_token_is_unauthenticated(system: System, start_secured: StartSecured, pki: Pki) -> None:
    """A token that is not in the tokens file: UNAUTHENTICATED, reason INVALID_TOKEN, unary and streaming."""
    secured = await start_secured(security_from(*token_settings(pki)))
    before = await event_count(system)

    async with secured.client(token=NOBODYS_TOKEN) as client:
        with pytest.raises(Unauthenticated) as command:
            await client.create_order("bad-token", "EUR")
        with pytest.raises(Unauthenticated) as watch:
            await anext(client.watch_order("order-1", timeout=5))

    assert [command.value.reason, watch.value.reason] == ["INVALID_TOKEN", "INVALID_TOKEN"]
    assert await event_count(system) == before


async def test_a_token_without_the_scope_is_permission_denied_and_changes_nothing(
    system: System, start_secured: StartSecured, pki: Pki
) -> None:
    """A queries-only token may query but not command: PERMISSION_DENIED, reason MISSING_SCOPE with
    the missing scope in the metadata, and no event appended."""
    secured = await start_secured(security_from(*token_settings(pki)))
    created = await system.commands.CreateOrder(create_request("scoped"))
    before = await event_count(system)

    async with secured.client(token=READER_TOKEN) as client:
        with pytest.raises(PermissionDenied) as denied:
            await client.add_item(created.result.order_id, "SKU-1", "Widget", 1, money(100, "EUR"))
        reply = await client.get_order(created.result.order_id, consistency_token=created.result.consistency_token)

    assert (denied.value.reason, denied.value.metadata) == ("MISSING_SCOPE", {"scope": "commands"})
    assert "'reader'" in denied.value.message
    assert await event_count(system) == before
    assert reply.order.version == 1


async def test_the_right_token_is_served_unary_and_streaming(start_secured: StartSecured, pki: Pki) -> None:
    """With a token that has the scopes, commands, queries and a WatchOrder stream all work; a plain
    development token (`token = ...`) works the same way."""
    secured = await start_secured(security_from(*token_settings(pki)))

    for token in (SHOP_TOKEN, DEV_TOKEN):
        async with secured.client(token=token) as client:
            session = client.session()
            created = await session.create_order(f"tok-{token[:3]}", "EUR")
            await session.add_item(created.order_id, "SKU-1", "Widget", 2, money(150, "EUR"))
            watch = session.watch_order(created.order_id, timeout=5)
            first = await anext(watch)
            await watch.aclose()
        assert (first.order.order_id, first.order.version) == (created.order_id, 2)


async def test_raw_channels_send_the_token_as_bearer_metadata(start_secured: StartSecured, pki: Pki) -> None:
    """Any gRPC client authenticates with `authorization: Bearer <token>` (the scheme in any case)."""
    secured = await start_secured(security_from(*token_settings(pki)))

    async with grpc.aio.insecure_channel(secured.write_address) as channel:
        commands = commands_pb2_grpc.OrderCommandsStub(channel)
        created = await commands.CreateOrder(
            create_request("raw"), metadata=(("authorization", f"bearer {SHOP_TOKEN}"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await commands.CreateOrder(create_request("raw"))
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await commands.CreateOrder(create_request("raw"), metadata=bearer_metadata(READER_TOKEN))
    async with grpc.aio.insecure_channel(secured.read_address) as channel:
        queries = queries_pb2_grpc.OrderQueriesStub(channel)
        watch = queries.WatchOrder(
            queries_pb2.WatchOrderRequest(order_id=created.result.order_id),
            metadata=bearer_metadata(NOBODYS_TOKEN),
            timeout=5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await watch.read()

    codes = [(e.value.code(), error_reason(e.value)) for e in (missing, denied, invalid)]
    assert codes == [
        (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS"),
        (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE"),
        (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"),
    ]
    assert dict(error_info(denied.value).metadata) == {"scope": "commands"}


async def test_health_and_reflection_are_open_by_default_and_closed_on_request(
    start_secured: StartSecured, pki: Pki
) -> None:
    """By default health checks and reflection need no token. With --open-services "" they need one
    (UNAUTHENTICATED without), but any valid token will do, whatever its scopes."""
    opened = await start_secured(security_from(*token_settings(pki)))
    closed = await start_secured(security_from(*token_settings(pki, "--open-services", "")))
    health_only = await start_secured(security_from(*token_settings(pki, "--open-services", "health")))
    ops = bearer_metadata(OPS_TOKEN)  # admin scope only: neither commands nor queries

    async with grpc.aio.insecure_channel(opened.write_address) as channel:
        await health_check(channel)
        assert "orders.v1.OrderCommands" in await list_services(channel)
    refusals = []
    async with grpc.aio.insecure_channel(closed.read_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as health_refused:
            await health_check(channel)
        with pytest.raises(grpc.aio.AioRpcError) as reflection_refused:
            await list_services(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as watch_refused:
            await watch.read()
        refusals = [
            (e.value.code(), error_reason(e.value)) for e in (health_refused, reflection_refused, watch_refused)
        ]
        await health_check(channel, ops)
        assert "orders.v1.OrderQueries" in await list_services(channel, ops)
    async with grpc.aio.insecure_channel(health_only.read_address) as channel:
        await health_check(channel)
        with pytest.raises(grpc.aio.AioRpcError) as reflection_closed:
            await list_services(channel)

    assert refusals == [(grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")] * 3
    assert reflection_closed.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_projection_admin_needs_the_admin_scope(system: System, pki: Pki) -> None:
    """The sync worker's ProjectionAdmin server, with the same settings: TLS, and only tokens with
    the `admin` scope."""
    settings = [*tls_settings(pki), *token_settings(pki)]
    pool = await connect(system.database_url, max_size=2)
    server = await start_admin("127.0.0.1:0", pool, system.redis, system.keys.prefix, security_from(*settings))
    try:
        async with tls_channel(f"127.0.0.1:{server.port}", TlsConfig(ca_file=pki.ca)) as channel:
            stub = admin_pb2_grpc.ProjectionAdminStub(channel)
            refused = []
            for metadata in ((), bearer_metadata(SHOP_TOKEN)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ListProjections(admin_pb2.ListProjectionsRequest(), metadata=metadata, timeout=5)
                refused.append((caught.value.code(), error_reason(caught.value)))
            with pytest.raises(grpc.aio.AioRpcError) as pause:
                await stub.PauseProjection(
                    admin_pb2.PauseProjectionRequest(name="orders"), metadata=bearer_metadata(READER_TOKEN)
                )
            reply = await stub.ListProjections(
                admin_pb2.ListProjectionsRequest(), metadata=bearer_metadata(OPS_TOKEN), timeout=5
            )
    finally:
        await server.stop(0)
        await pool.close()

    assert refused == [
        (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS"),
        (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE"),
    ]
    assert dict(error_info(pause.value).metadata) == {"scope": "admin"}
    assert {status.name for status in reply.projections} == {"orders", "customer_summary"}


class RecordingQueries:
    """An OrderQueries servicer that answers GetOrder with an empty reply, noting who called."""

    def __init__(self) -> None:
        self.callers: list[str | None] = []

    def __getattr__(self, name: str) -> Callable[..., Awaitable[queries_pb2.GetOrderResponse]]:
        async def method(_request: object, _context: object) -> queries_pb2.GetOrderResponse:
            self.callers.append(current_caller.get())
            return queries_pb2.GetOrderResponse()

        return method


async def test_the_servicer_sees_the_callers_name(pki: Pki) -> None:
    """orders.telemetry.logs.current_caller holds the authenticated caller's name during its call only."""
    servicer = RecordingQueries()
    server = await start_server("127.0.0.1:0", {QUERIES: servicer}, security=security_from(*token_settings(pki)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = queries_pb2_grpc.OrderQueriesStub(channel)
            for token in (READER_TOKEN, SHOP_TOKEN, DEV_TOKEN):
                await stub.GetOrder(queries_pb2.GetOrderRequest(order_id="o"), metadata=bearer_metadata(token))
    finally:
        await server.stop(0)

    assert servicer.callers == ["reader", "shop", "dev"]
    assert current_caller.get() is None


async def test_refusals_are_logged_without_the_token(
    start_secured: StartSecured, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refusal is one INFO line with the method (and caller, when known), never the token; the
    start warns that tokens travel in clear without TLS, and about the plain development token."""
    with caplog.at_level(logging.INFO, logger="orders.server.security"):
        secured = await start_secured(security_from(*token_settings(pki)))
        async with secured.client(token=NOBODYS_TOKEN) as client:
            with pytest.raises(Unauthenticated):
                await client.create_order("logged", "EUR")
        async with secured.client(token=READER_TOKEN) as client:
            with pytest.raises(PermissionDenied):
                await client.create_order("logged", "EUR")

    records = [r for r in caplog.records if r.name == "orders.server.security"]
    refusals = [r.getMessage() for r in records if r.getMessage().startswith("refused")]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert refusals == [
        "refused /orders.v1.OrderCommands/CreateOrder: unknown bearer token",
        "refused /orders.v1.OrderCommands/CreateOrder to caller 'reader': no scope 'commands'",
    ]
    assert any("tokens travel in clear text" in w for w in warnings)
    assert any("dev" in w and "development only" in w for w in warnings)
    assert not [r for r in caplog.records if NOBODYS_TOKEN in r.getMessage() or READER_TOKEN in r.getMessage()]


# ---------------------------------------------------------------------------- command lines


async def test_orders_cli_against_a_server_with_mutual_tls_and_tokens(start_secured: StartSecured, pki: Pki) -> None:
    """`orders --auth-token ... --tls-ca-file ...` (flags, or the same settings from the environment)
    works against services with mutual TLS and tokens; without the token it says what is missing."""
    secured = await start_secured(security_from(*mtls_settings(pki), *token_settings(pki)))
    env = child_environment(
        {
            "ORDERS_WRITE_ADDRESS": secured.write_address,
            "ORDERS_READ_ADDRESS": secured.read_address,
            "ORDERS_TLS_CERT_FILE": str(pki.client_cert),
            "ORDERS_TLS_KEY_FILE": str(pki.client_key),
        }
    )
    flags = ["--auth-token", SHOP_TOKEN, "--tls-ca-file", str(pki.ca)]

    created = await run_to_end(
        script_command("orders", *flags, "--json", "create", "--customer", "cli-eve", "--currency", "EUR"), env
    )
    assert created[0] == 0, created[2]
    result = commands_json(created[1])
    env_settings = env | {"ORDERS_AUTH_TOKEN": SHOP_TOKEN, "ORDERS_TLS_CA_FILE": str(pki.ca)}
    shown = await run_to_end(
        script_command("orders", "get", result["order_id"], "--token", result["consistency_token"]), env_settings
    )
    refused = await run_to_end(
        script_command("orders", "get", result["order_id"]), env | {"ORDERS_TLS_CA_FILE": str(pki.ca)}
    )

    assert shown[0] == 0, shown[2]
    assert "cli-eve" in shown[1]
    assert refused[0] == 1
    assert refused[2].startswith("orders: UNAUTHENTICATED MISSING_CREDENTIALS: ")
    assert SHOP_TOKEN not in shown[1] + shown[2]


def commands_json(out: str) -> dict[str, str]:
    parsed = json.loads(out)
    assert isinstance(parsed, dict)
    return parsed


async def test_orders_admin_against_a_secured_projection_admin(system: System, pki: Pki) -> None:
    """`orders-admin list` with ORDERS_TLS_CA_FILE and ORDERS_AUTH_TOKEN (admin scope) lists the
    projections; a token without the admin scope is refused with PERMISSION_DENIED."""
    pool = await connect(system.database_url, max_size=2)
    security = security_from(*tls_settings(pki), *token_settings(pki))
    server = await start_admin("127.0.0.1:0", pool, system.redis, system.keys.prefix, security)
    env = child_environment({"ORDERS_ADMIN_ADDRESS": f"localhost:{server.port}", "ORDERS_TLS_CA_FILE": str(pki.ca)})
    try:
        listed = await run_to_end(script_command("orders-admin", "list"), env | {"ORDERS_AUTH_TOKEN": OPS_TOKEN})
        denied = await run_to_end(script_command("orders-admin", "list"), env | {"ORDERS_AUTH_TOKEN": SHOP_TOKEN})
    finally:
        await server.stop(0)
        await pool.close()

    assert listed[0] == 0, listed[2]
    assert "customer_summary" in listed[1]
    assert denied[0] == 1
    assert denied[2].startswith("orders-admin: PERMISSION_DENIED: caller 'shop' may not call orders.v1.ProjectionAdmin")

"""`orders-admin`: the ProjectionAdmin API for people.

    orders-admin list                      every projection: state, checkpoint, lag, errors
    orders-admin pause NAME | resume NAME  stop or restart applying events
    orders-admin rebuild NAME [--wait]     replay a projection from scratch into a new generation of
                                           keys while the current one serves, then switch; --wait
                                           shows progress (events done of total, rate, time left)
    orders-admin rebuild NAME --in-place   delete the views and replay them in place (no room for
                                           two generations; queries answer UNAVAILABLE meanwhile)
    orders-admin parked NAME               orders parked on a poison event (--poison-policy park)
    orders-admin retry NAME ORDER_ID       apply an order's parked events again, in order
                                           (in the partition that holds the order)
    orders-admin drop-partitioning --partitions N [--dry-run]
                                           delete every Redis key of partition count N, once
                                           a new count serves (docs/operations.md, "Changing the
                                           partition count"); talks to Redis, not to the API

Partitions: when the workers split each projection into partitions (ORDERS_PARTITIONS > 1), `list`
shows one row per partition, named PROJECTION/K with K from 0 ("orders/2"). NAME is then a
projection (every partition of it: `pause orders` pauses them all) or one partition (`pause
orders/2`, `rebuild customer_summary/0 --wait`). With one partition, NAME is the projection's.

Tables by default, `--json` for scripts. The address comes from ORDERS_ADMIN_ADDRESS
(or --admin-address), as for the sync worker that serves the API. A secured API (docs/security.md)
needs --tls-ca-file (mutual TLS: also --tls-cert-file, --tls-key-file) and --auth-token with the
`admin` scope, or their variables (ORDERS_TLS_CA_FILE, ..., ORDERS_AUTH_TOKEN).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence

import grpc
from google.protobuf.json_format import MessageToJson

from orders import config
from orders.cli import partitioning
from orders.cli import settings as client_settings
from orders.client import TlsConfig, bearer_metadata
from orders.store.views import redis_client
from orders.v1 import admin_pb2 as pb
from orders.v1 import admin_pb2_grpc

DEFAULT_ADMIN_ADDRESS = "127.0.0.1:50053"
PROJECTION_HELP = "projection name, e.g. orders or customer_summary (every partition of it), or one partition: orders/2"
Metadata = tuple[tuple[str, str], ...]
COLUMNS = ("PROJECTION", "STATE", "CHECKPOINT", "LAG", "LAG AGE", "APPLIED", "WORKER", "NOTE")
PARKED_COLUMNS = ("PARKED", "GENERATION")  # shown when some partition has parked orders or a generation


def state_name(state: pb.ProjectionState.ValueType) -> str:
    return pb.ProjectionState.Name(state).removeprefix("PROJECTION_STATE_").lower().replace("_", " ")


def progress(status: pb.ProjectionStatus) -> str:
    rebuild = status.rebuild
    if not status.HasField("rebuild"):
        return status.last_error
    share = rebuild.events_done / rebuild.events_total if rebuild.events_total else 1.0
    kind = "in place" if rebuild.in_place else f"into generation {rebuild.generation}"
    return (
        f"rebuild {kind} {rebuild.events_done}/{rebuild.events_total} ({share:.0%}), "
        f"{rebuild.events_per_second:,.0f} events/s, {rebuild.seconds_left:.0f}s left"
    )


def covers(name: str, status: pb.ProjectionStatus) -> bool:
    """Whether a command's NAME covers a listed status: its projection, or the partition itself."""
    return status.name == name or status.name.startswith(f"{name}/")


def table(statuses: Sequence[pb.ProjectionStatus]) -> str:
    """Columns for the parked orders and the generation only when one of them is not 0, so that the
    usual table stays as it was."""
    extra = any(s.parked_orders or s.generation or "/" in s.name for s in statuses)
    header = COLUMNS[:-1] + PARKED_COLUMNS + COLUMNS[-1:] if extra else COLUMNS
    rows = [header] + [
        (
            s.name,
            state_name(s.state),
            s.checkpoint or "-",
            str(s.lag_events),
            f"{s.lag_seconds:.1f}s",
            str(s.applied_events),
            s.worker_id or "-",
            *((str(s.parked_orders), str(s.generation)) if extra else ()),
            progress(s),
        )
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def show(statuses: Sequence[pb.ProjectionStatus], as_json: bool) -> None:
    if as_json:
        print(MessageToJson(pb.ListProjectionsResponse(projections=statuses), preserving_proto_field_name=True))
    else:
        print(table(statuses))


def wait_for_rebuild(
    stub: admin_pb2_grpc.ProjectionAdminStub, name: str, as_json: bool, metadata: Metadata = ()
) -> None:
    """Prints progress until the projection (each partition `name` covers) runs again, or stops on
    an error."""
    settled = (pb.PROJECTION_STATE_RUNNING, pb.PROJECTION_STATE_STOPPED_ON_ERROR)
    while True:
        reply = stub.ListProjections(pb.ListProjectionsRequest(), timeout=10, metadata=metadata)
        statuses = [s for s in reply.projections if covers(name, s)]
        if not as_json:
            for status in statuses:
                print(f"{status.name}: {state_name(status.state)}; {progress(status) or 'caught up'}", flush=True)
        if all(status.state in settled for status in statuses):
            show(statuses, as_json)
            return
        time.sleep(1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = config.SettingsParser(
        prog="orders-admin", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config.add_setting(
        parser,
        "admin-address",
        "HOST:PORT of ProjectionAdmin (a sync worker)",
        default=DEFAULT_ADMIN_ADDRESS,
        parse=config.address,
    )
    client_settings.add_client_security_arguments(parser)
    config.add_log_argument(parser)  # checked as the services check it, though only libraries log here
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="show every projection")
    for name, text in (
        ("pause", "stop applying events"),
        ("resume", "apply events again"),
        ("rebuild", "replay from scratch into a new generation, then switch (or --in-place)"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("projection", help=PROJECTION_HELP)
        if name == "rebuild":
            command.add_argument("--wait", action="store_true", help="show progress until the rebuild is done")
            command.add_argument(
                "--in-place", action="store_true", help="delete the views and replay them in place (downtime)"
            )
    commands.add_parser("parked", help="list parked orders").add_argument("projection", help=PROJECTION_HELP)
    retry = commands.add_parser("retry", help="retry an order's parked events")
    retry.add_argument("projection", help=PROJECTION_HELP)
    retry.add_argument("order_id")
    add_drop_arguments(commands.add_parser("drop-partitioning", help="delete the keys of one partition count"))
    return parser.parse_args(argv)


def add_drop_arguments(drop: config.SettingsParser) -> None:
    drop.add_argument(
        "--partitions", required=True, type=config.partition_count, help="the partition count whose keys to delete"
    )
    drop.add_argument("--dry-run", action="store_true", help="count the keys, delete nothing")
    drop.add_argument(
        "--stale-after",
        type=config.positive_float,
        default=30.0,
        help="seconds since a partition's last worker heartbeat before it counts as gone (default 30)",
    )
    config.add_setting(drop, "redis-url", "Redis holding the read views (the sync worker's)", parse=config.redis_url)
    config.add_setting(drop, "redis-prefix", "prefix of every Redis key and channel", default="orders:")


def drop_partitioning(args: argparse.Namespace) -> None:
    """Refuses the count this process's ORDERS_PARTITIONS names (a worker pod's: the count in use)."""
    if os.environ.get("ORDERS_PARTITIONS", "").strip() == str(args.partitions):
        sys.exit(f"orders-admin: ORDERS_PARTITIONS is {args.partitions} here: that count is in use, not dropped")

    async def drop() -> partitioning.Dropped:
        redis = redis_client(args.redis_url)
        try:
            return await partitioning.drop_partitioning(
                redis, args.redis_prefix, args.partitions, stale_after=args.stale_after, dry_run=args.dry_run
            )
        finally:
            await redis.aclose()

    try:
        dropped = asyncio.run(drop())
    except partitioning.WorkersStillRunning as error:
        sys.exit(f"orders-admin: {error}")
    verb = "found (dry run, nothing deleted)" if args.dry_run else "deleted"
    print(f"partition count {dropped.partitions}: {dropped.keys} keys {verb}")


def show_parked(reply: pb.ListParkedOrdersResponse, as_json: bool) -> None:
    if as_json:
        print(MessageToJson(reply, preserving_proto_field_name=True))
        return
    partitioned = any("/" in order.partition for order in reply.orders)
    for order in reply.orders:
        where = f"{order.partition}  " if partitioned else ""
        print(f"{where}{order.order_id}  positions {', '.join(map(str, order.positions))}  {order.error}")
    if not reply.orders:
        print("no parked orders")


def open_channel(address: str, tls: TlsConfig | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(address, tls.credentials(), options=options)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config.setup_logging(args.log_level, args.log_format)
    if args.command == "drop-partitioning":
        drop_partitioning(args)
        return
    command, name, as_json = args.command, getattr(args, "projection", ""), args.json
    metadata = bearer_metadata(args.auth_token)
    with open_channel(args.admin_address, args.tls) as channel:
        stub = admin_pb2_grpc.ProjectionAdminStub(channel)
        try:
            if command == "list":
                reply = stub.ListProjections(pb.ListProjectionsRequest(), timeout=10, metadata=metadata)
                show(reply.projections, as_json)
                return
            if command == "parked":
                parked = pb.ListParkedOrdersRequest(name=name)
                show_parked(stub.ListParkedOrders(parked, timeout=10, metadata=metadata), as_json)
                return
            if command == "retry":
                retry = pb.RetryParkedOrderRequest(name=name, order_id=args.order_id)
                stub.RetryParkedOrder(retry, timeout=10, metadata=metadata)
                print(f"retry of {args.order_id!r} queued; `orders-admin parked {name}` shows the outcome")
                return
            call = {"pause": stub.PauseProjection, "resume": stub.ResumeProjection, "rebuild": stub.RebuildProjection}
            request = {
                "pause": pb.PauseProjectionRequest,
                "resume": pb.ResumeProjectionRequest,
                "rebuild": pb.RebuildProjectionRequest,
            }[command](name=name)
            if command == "rebuild":
                request = pb.RebuildProjectionRequest(name=name, in_place=args.in_place)
            reply = call[command](request, timeout=30, metadata=metadata)
            if command == "rebuild" and args.wait:
                wait_for_rebuild(stub, name, as_json, metadata)
            else:
                show(reply.partitions or [reply.projection], as_json)
        except grpc.RpcError as error:
            sys.exit(f"orders-admin: {error.code().name}: {error.details()}")


if __name__ == "__main__":
    main()

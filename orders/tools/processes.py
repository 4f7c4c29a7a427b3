"""Starting and stopping the services as child processes, the one way the local runner, the
benchmark and the tests all do it.

A service is named by its console script (`orders-write-service`), never by its package: the
shared core does not know the service packages (see the import-linter contracts), and the console
script is what an operator runs. The child runs what the installed script runs (its entry point,
found in the package metadata), but as `sys.executable -c "...; sys.exit(main())"` rather than as
the script file next to the interpreter: it then runs on exactly the parent's interpreter (the
same virtualenv and options) even where no script file was installed or its #! line names another
Python. Not `python -m <module>` either: that runs only modules that end by calling main() when
run as __main__ (orders-migrate's does not), and loads the module a second time if it is imported.

A started process can be waited for until it is ready (gRPC health reports SERVING, or a port
accepts connections), failing at once with the tail of its log if it exits first, and stopped:
SIGTERM (the services' graceful stop), then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import SIGCONT, SIGKILL, SIGTERM, Signals
from typing import IO, Literal, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("orders.processes")

READY_TIMEOUT = 60.0
STOP_GRACE = 15.0  # seconds after SIGTERM before SIGKILL: more than a service's default shutdown grace (10 s)
POLL_EVERY = 0.1
PIPE: Literal["pipe"] = "pipe"
# Where a child's output goes: a file (stdout and stderr appended), PIPE (stderr, where the services
# log, to a pipe of the parent's; stdout inherited), or None (both inherited).
Output = Path | Literal["pipe"] | None


class ServiceExited(RuntimeError):
    """A service process exited while it was awaited to become ready."""


class NotReady(RuntimeError):
    """A service process did not become ready in time."""


# ------------------------------------------------------------------------------ the command


@functools.cache
def _entry_point(script: str) -> importlib.metadata.EntryPoint:
    found = importlib.metadata.entry_points(group="console_scripts", name=script)
    if not found:
        raise LookupError(f"no console script {script!r} is installed (pip install -e . installs them)")
    return next(iter(found))


def script_command(script: str, *args: str) -> list[str]:
    """The command line that runs console script `script` with `args` on this interpreter."""
    entry = _entry_point(script)
    code = f"import sys; from {entry.module} import {entry.attr}; sys.exit({entry.attr}())"
    return [sys.executable, "-c", code, *args]


def child_environment(settings: Mapping[str, str] | None = None, *, inherit_settings: bool = False) -> dict[str, str]:
    """This process's environment plus `settings`; without the ORDERS_* variables found here unless
    `inherit_settings`, so that a developer's own settings never leak into a test's services."""
    base = {k: v for k, v in os.environ.items() if inherit_settings or not k.startswith("ORDERS_")}
    return base | dict(settings or {})


@contextlib.contextmanager
def _stdio(output: Output) -> Iterator[tuple[IO[bytes] | int | None, IO[bytes] | int | None]]:
    """(stdout, stderr) for the child; a log file is open only while the child is started."""
    if output is None:
        yield None, None
    elif output == PIPE:
        yield None, subprocess.PIPE
    else:
        with Path(output).open("ab") as file:
            yield file, file


# ------------------------------------------------------------------------------ readiness


class Ready(Protocol):
    """A quick blocking check (a second at most) of whether a service is ready; str() says what it waits for."""

    def __call__(self) -> bool: ...


@dataclass(frozen=True)
class HealthServing:
    """gRPC health at `address` reports `service` ("" : the server as a whole) SERVING."""

    address: str
    service: str = ""

    def __call__(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:  # a new channel each time: no reconnect backoff
            try:
                request = health_pb2.HealthCheckRequest(service=self.service)
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def __str__(self) -> str:
        return f"{self.address} to report {self.service or 'the server'} SERVING"


@dataclass(frozen=True)
class PortOpen:
    """Something accepts TCP connections at `address` (HOST:PORT)."""

    address: str

    def __call__(self) -> bool:
        host, _, port = self.address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        except OSError:
            return False

    def __str__(self) -> str:
        return f"{self.address} to accept connections"


def log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return "(not kept here: see its output)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------ asyncio


@dataclass
class ServiceProcess:
    """A service running as a child process (asyncio)."""

    name: str
    process: asyncio.subprocess.Process
    log_file: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def signal(self, sig: Signals) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_file, lines)

    async def wait_ready(
        self, ready: Ready, timeout: float = READY_TIMEOUT, *, alongside: Iterable[ServiceProcess] = ()
    ) -> None:
        """Returns once `ready()`; ServiceExited if this process (or one `alongside`) exits first,
        NotReady after `timeout` seconds."""
        watched = [self, *alongside]
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(ready):
            for service in watched:
                if service.returncode is not None:
                    raise ServiceExited(_exited(service.name, service.returncode, service.log_tail()))
            if time.monotonic() > deadline:
                raise NotReady(f"{self.name} did not get ready within {timeout:g}s: waited for {ready}")
            await asyncio.sleep(POLL_EVERY)

    async def stop(self, grace: float = STOP_GRACE, sig: Signals = SIGTERM) -> int:
        """Sends `sig`, and SIGCONT in case it was stopped (SIGSTOP), then SIGKILL if it has not exited
        within `grace` seconds. Returns its exit code (negative: the signal that ended it)."""
        self.signal(sig)
        self.signal(SIGCONT)
        try:
            return await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            log.warning("%s (pid %d) did not stop within %gs; killing it", self.name, self.pid, grace)
            self.signal(SIGKILL)
            return await self.process.wait()


async def start_process(
    name: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log: Output = None,
    own_session: bool = False,
) -> ServiceProcess:
    """Starts `command` (for what is not a console script, such as a benchmark's helper server).
    `env`: the child's whole environment (None: this one's); `own_session`: a Ctrl-C in the terminal
    reaches only the parent, which then stops the child itself, exactly once."""
    with _stdio(log) as (stdout, stderr):
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=own_session,
        )
    return ServiceProcess(name, process, log if isinstance(log, Path) else None)


async def start_service(
    script: str, *args: str, env: Mapping[str, str] | None = None, log: Output = None, own_session: bool = False
) -> ServiceProcess:
    """Starts the service of console script `script` (see start_process for the options)."""
    return await start_process(script, script_command(script, *args), env=env, log=log, own_session=own_session)


# ------------------------------------------------------------------------------ blocking


@dataclass
class BlockingServiceProcess:
    """A service running as a child process, for synchronous callers (a Hypothesis state machine)."""

    name: str
    process: subprocess.Popen[bytes]
    log_file: Path | None = None

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_file, lines)

    def wait_ready(self, ready: Ready, timeout: float = READY_TIMEOUT) -> None:
        """As ServiceProcess.wait_ready."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                raise ServiceExited(_exited(self.name, self.process.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                raise NotReady(f"{self.name} did not get ready within {timeout:g}s: waited for {ready}")
            time.sleep(POLL_EVERY)

    def stop(self, grace: float = STOP_GRACE) -> int:
        """As ServiceProcess.stop, with SIGTERM."""
        if self.process.poll() is None:
            self.process.send_signal(SIGTERM)
            self.process.send_signal(SIGCONT)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop within %gs; killing it", self.name, self.process.pid, grace)
            self.process.kill()
            return self.process.wait()


def start_service_blocking(
    script: str, *args: str, env: Mapping[str, str] | None = None, log: Output = None
) -> BlockingServiceProcess:
    """start_service for synchronous callers."""
    with _stdio(log) as (stdout, stderr):
        process = subprocess.Popen(
            script_command(script, *args), env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
    return BlockingServiceProcess(script, process, log if isinstance(log, Path) else None)


def _exited(name: str, code: int, tail: str) -> str:
    return f"{name} exited with status {code} before it was ready; its last output:\n{tail}"

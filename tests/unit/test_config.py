"""Settings of the console scripts (orders.config): flag beats env var beats default, and bad or
missing values stop the process with status 2 and an error naming the setting."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from orders import config
from orders.config import env_name
from orders.telemetry.logs import LogFormat, LogLevel
from orders.telemetry.tracing import TracingMode
from read_service.main import ReadSettings
from read_service.main import parse_settings as parse_read
from sync_worker.main import SyncSettings
from sync_worker.main import parse_settings as parse_sync
from sync_worker.parking import PoisonPolicy
from write_service.main import WriteSettings
from write_service.main import parse_settings as parse_write

STOP = PoisonPolicy.STOP
PG = "postgresql://orders@db:5432/orders"
REDIS = "redis://cache:6379/0"
SUCCESS = 0
USAGE_ERROR = 2  # argparse's exit status for bad command lines
Parse = Callable[[Sequence[str] | None], Any]
SERVICES: dict[str, tuple[Parse, dict[str, str]]] = {
    # name: (parse_settings, its required settings with a valid value)
    "write": (parse_write, {"postgres-url": PG}),
    "read": (parse_read, {"redis-url": REDIS}),
    "sync": (parse_sync, {"postgres-url": PG, "redis-url": REDIS}),
}


@pytest.fixture(autouse=True)
def no_orders_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without any ORDERS_* variable from the developer's or CI's environment."""
    for name in list(os.environ):
        if name.startswith("ORDERS_"):
            monkeypatch.delenv(name)


def required_args(service: str, *, except_flag: str = "") -> list[str]:
    """Flags giving every required setting of `service` but `except_flag`."""
    _, required = SERVICES[service]
    return [arg for flag, value in required.items() if flag != except_flag for arg in (f"--{flag}", value)]


def parse(service: str, argv: list[str]) -> Any:
    parse_settings, _ = SERVICES[service]
    return parse_settings(argv)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


# --- defaults and precedence ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("write", WriteSettings(PG, "127.0.0.1:50051", 10.0, 1000, 20, 10_000, LogLevel.INFO)),
        ("read", ReadSettings(REDIS, "orders:", "127.0.0.1:50052", 10.0, 1000, 5.0, 5.0, LogLevel.INFO)),
        (
            "sync",
            SyncSettings(
                PG, REDIS, "orders:", 500, 1.0, 5.0, "", ["orders", "customer_summary"], STOP, "", LogLevel.INFO
            ),
        ),
    ],
)
def test_defaults(service: str, expected: object) -> None:
    """With only the required settings given, every other setting has its documented default, parsed."""
    assert expected == parse(service, required_args(service))


@dataclass(frozen=True)
class Precedence:
    """One setting of one service: a value for its env var and one for its flag, and what each parses to."""

    service: str
    flag: str
    env_value: str
    flag_value: str
    env_expected: object
    flag_expected: object

    @property
    def attribute(self) -> str:
        return self.flag.replace("-", "_")

    def __str__(self) -> str:
        return f"{self.service}-{self.flag}"


PRECEDENCE = [
    Precedence("write", "postgres-url", "postgres://a/x", "postgresql://b/y", "postgres://a/x", "postgresql://b/y"),
    Precedence("write", "write-address", "0.0.0.0:1", "[::1]:2", "0.0.0.0:1", "[::1]:2"),
    Precedence("write", "shutdown-grace", "2.5", "0.5", 2.5, 0.5),
    Precedence("write", "max-concurrent-rpcs", "10", "20", 10, 20),
    Precedence("write", "pool-size", "5", "7", 5, 7),
    Precedence("write", "state-cache-size", "0", "500", 0, 500),
    Precedence("write", "log-level", "debug", "Warning", "DEBUG", "WARNING"),
    Precedence("write", "processes", "2", "4", 2, 4),
    Precedence("read", "redis-url", "rediss://a:1/0", "unix:///tmp/r.sock", "rediss://a:1/0", "unix:///tmp/r.sock"),
    Precedence("read", "redis-prefix", "a:", "b:", "a:", "b:"),
    Precedence("read", "read-address", "localhost:7000", "localhost:7001", "localhost:7000", "localhost:7001"),
    Precedence("read", "max-consistency-wait", "0.25", "2", 0.25, 2.0),
    Precedence("read", "max-concurrent-rpcs", "3", "4", 3, 4),
    Precedence("read", "heartbeat-timeout", "1.5", "9", 1.5, 9.0),
    Precedence("read", "processes", "3", "1", 3, 1),
    Precedence("sync", "postgres-url", "postgres://a/x", "postgresql://b/y", "postgres://a/x", "postgresql://b/y"),
    Precedence("sync", "redis-url", "redis://a/1", "redis://b/2", "redis://a/1", "redis://b/2"),
    Precedence("sync", "redis-prefix", "", "x:", "", "x:"),
    Precedence("sync", "batch-size", "50", "60", 50, 60),
    Precedence("sync", "poll-interval", "0.1", "3", 0.1, 3.0),
    Precedence("sync", "lease-ttl", "2", "0.5", 2.0, 0.5),
    Precedence("sync", "worker-id", "w-env", "w-flag", "w-env", "w-flag"),
    Precedence("sync", "log-level", "error", "info", "ERROR", "INFO"),
]


@pytest.mark.parametrize("case", PRECEDENCE, ids=str)
def test_env_var_beats_default(monkeypatch: pytest.MonkeyPatch, case: Precedence) -> None:
    """ORDERS_<FLAG> replaces the default (and satisfies a required setting), parsed like the flag."""
    monkeypatch.setenv(env_name(case.flag), case.env_value)

    settings = parse(case.service, required_args(case.service, except_flag=case.flag))

    assert case.env_expected == getattr(settings, case.attribute)


@pytest.mark.parametrize("case", PRECEDENCE, ids=str)
def test_flag_beats_env_var(monkeypatch: pytest.MonkeyPatch, case: Precedence) -> None:
    """A command-line flag wins over its environment variable."""
    monkeypatch.setenv(env_name(case.flag), case.env_value)

    settings = parse(
        case.service, [*required_args(case.service, except_flag=case.flag), f"--{case.flag}", case.flag_value]
    )

    assert case.flag_expected == getattr(settings, case.attribute)


def test_flag_beats_even_an_invalid_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value in the environment does not matter when the flag is given."""
    monkeypatch.setenv("ORDERS_POOL_SIZE", "lots")

    expected = 3

    assert expected == parse("write", [*required_args("write"), "--pool-size", "3"]).pool_size


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("postgres-url", "ORDERS_POSTGRES_URL"),
        ("max-concurrent-rpcs", "ORDERS_MAX_CONCURRENT_RPCS"),
        ("log-level", "ORDERS_LOG_LEVEL"),
    ],
)
def test_env_var_name_of_a_flag(flag: str, expected: str) -> None:
    """The variable is ORDERS_ and the flag in upper case with underscores."""
    assert expected == env_name(flag)


def test_help_names_the_env_var_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    """--help shows, for each setting, its environment variable and its default or that it is required."""
    with pytest.raises(SystemExit) as caught:
        parse("write", ["--help"])

    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    expected_status = SUCCESS
    assert expected_status == caught.value.code
    assert "[env ORDERS_POSTGRES_URL; required]" in out
    assert "[env ORDERS_POOL_SIZE; default: 20]" in out


# --- bad and missing values ----------------------------------------------------------------------


BAD_VALUES = [
    ("write", "postgres-url", "mysql://db/orders"),
    ("write", "postgres-url", ""),
    ("write", "write-address", "no-port"),
    ("write", "write-address", ":50051"),
    ("write", "write-address", "host:99999"),
    ("write", "write-address", "host:http"),
    ("write", "shutdown-grace", "0"),
    ("write", "shutdown-grace", "-1"),
    ("write", "shutdown-grace", "soon"),
    ("write", "max-concurrent-rpcs", "0"),
    ("write", "max-concurrent-rpcs", "1.5"),
    ("write", "pool-size", "-3"),
    ("write", "state-cache-size", "-1"),
    ("write", "log-level", "TRACE"),
    ("write", "processes", "0"),
    ("write", "processes", "all"),
    ("read", "redis-url", "http://cache:6379"),
    ("read", "read-address", "localhost"),
    ("read", "max-consistency-wait", "0"),
    ("read", "log-level", "verbose"),
    ("read", "processes", "-2"),
    ("sync", "redis-url", "cache:6379"),
    ("sync", "postgres-url", "sqlite:///x.db"),
    ("sync", "batch-size", "0"),
    ("sync", "poll-interval", "-0.1"),
]


@pytest.mark.parametrize("source", ["flag", "env"])
@pytest.mark.parametrize("case", BAD_VALUES, ids=[f"{s}-{f}-{v!r}" for s, f, v in BAD_VALUES])
def test_bad_value_exits_2_naming_flag_and_env_var(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], source: str, case: tuple[str, str, str]
) -> None:
    """A bad value, from the flag or from the environment, exits with status 2 and one error line
    that names the flag, its environment variable and the rejected value."""
    service, flag, value = case
    argv = required_args(service, except_flag=flag)
    if source == "flag":
        argv += [f"--{flag}", value]
    else:
        monkeypatch.setenv(env_name(flag), value)

    with pytest.raises(SystemExit) as caught:
        parse(service, argv)

    [line] = error_lines(capsys.readouterr().err)
    expected_status = USAGE_ERROR
    assert expected_status == caught.value.code
    assert f"--{flag}" in line
    assert f"({env_name(flag)})" in line
    assert repr(value) in line


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--postgres-url", PG, "--pool-size", "0"], id="bad-value"),
        pytest.param([], id="missing-setting"),
    ],
)
def test_stderr_is_a_single_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """A bad or missing setting writes nothing to stderr but its one error line."""
    with pytest.raises(SystemExit):
        parse("write", argv)

    stderr = capsys.readouterr().err
    expected = error_lines(stderr)  # the error line, and nothing else
    assert expected == stderr.splitlines()


@pytest.mark.parametrize("value", ["nan", "NaN"])
def test_nan_is_not_a_positive_number(capsys: pytest.CaptureFixture[str], value: str) -> None:
    """NaN is not > 0: --shutdown-grace nan is refused like any other non-positive number."""
    with pytest.raises(SystemExit) as caught:
        parse("write", [*required_args("write"), "--shutdown-grace", value])

    expected_status = USAGE_ERROR
    assert expected_status == caught.value.code
    assert "--shutdown-grace" in error_lines(capsys.readouterr().err)[0]


@pytest.mark.parametrize(
    ("service", "given", "missing"),
    [
        ("write", {}, "postgres-url"),
        ("read", {}, "redis-url"),
        ("sync", {}, "postgres-url"),
        ("sync", {"ORDERS_POSTGRES_URL": PG}, "redis-url"),
        ("sync", {"ORDERS_REDIS_URL": REDIS}, "postgres-url"),
    ],
)
def test_missing_required_setting_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    service: str,
    given: dict[str, str],
    missing: str,
) -> None:
    """Without the flag or its environment variable, a required setting stops the process with
    status 2 and an error line naming both the flag and the variable."""
    for name, value in given.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SystemExit) as caught:
        parse(service, [])

    [line] = error_lines(capsys.readouterr().err)
    expected_status = USAGE_ERROR
    assert expected_status == caught.value.code
    assert f"missing setting --{missing} (or {env_name(missing)})" in line


def test_required_setting_from_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    """A required setting can come from its environment variable alone."""
    monkeypatch.setenv("ORDERS_POSTGRES_URL", PG)
    monkeypatch.setenv("ORDERS_REDIS_URL", REDIS)

    settings = parse("sync", [])

    expected = (PG, REDIS)
    assert expected == (settings.postgres_url, settings.redis_url)


# --- typed settings ------------------------------------------------------------------------------


def test_closed_sets_are_enums() -> None:
    """Log level, log format, tracing mode and poison policy parse to their enums, not strings."""
    argv = [*required_args("sync"), "--log-level", "debug", "--log-format", "text", "--tracing", "off"]

    settings = parse("sync", [*argv, "--poison-policy", "park"])

    assert (settings.log_level, settings.log_format, settings.tracing, settings.poison_policy) == (
        LogLevel.DEBUG,
        LogFormat.TEXT,
        TracingMode.OFF,
        PoisonPolicy.PARK,
    )
    assert all(
        type(value) is kind
        for value, kind in [
            (settings.log_level, LogLevel),
            (settings.log_format, LogFormat),
            (settings.tracing, TracingMode),
            (settings.poison_policy, PoisonPolicy),
        ]
    )


@pytest.mark.parametrize(
    ("service", "flag", "value", "expected"),
    [
        ("write", "log-level", "LOUD", "expected DEBUG, INFO, WARNING or ERROR, got 'LOUD'"),
        ("write", "log-format", "xml", "expected auto, json or text, got 'xml'"),
        ("read", "tracing", "jaeger", "expected auto, otlp, console or off, got 'jaeger'"),
        ("sync", "poison-policy", "skip", "expected stop or park, got 'skip'"),
    ],
)
def test_a_value_outside_a_closed_set_lists_the_allowed_ones(
    capsys: pytest.CaptureFixture[str], service: str, flag: str, value: str, expected: str
) -> None:
    with pytest.raises(SystemExit):
        parse(service, [*required_args(service), f"--{flag}", value])

    [line] = error_lines(capsys.readouterr().err)
    assert f"--{flag}: ({env_name(flag)}) {expected}" in line


@pytest.mark.parametrize(
    ("service", "flag", "value", "expected"),
    [
        ("write", "pool-size", "twenty", "expected an integer > 0, got 'twenty'"),
        ("write", "state-cache-size", "1e4", "expected an integer >= 0, got '1e4'"),
        ("write", "shutdown-grace", "soon", "expected a number > 0, got 'soon'"),
        ("sync", "batch-size", "", "expected an integer > 0, got ''"),
    ],
)
def test_a_non_numeric_number_says_what_is_expected(
    capsys: pytest.CaptureFixture[str], service: str, flag: str, value: str, expected: str
) -> None:
    """Not Python's "invalid literal for int() with base 10", but what the setting takes."""
    with pytest.raises(SystemExit):
        parse(service, [*required_args(service), f"--{flag}", value])

    [line] = error_lines(capsys.readouterr().err)
    assert expected in line
    assert "invalid literal" not in line
    assert "could not convert" not in line


@dataclass(frozen=True)
class Small:
    count: int
    level: LogLevel
    note: str | None = None


def test_settings_from_builds_the_dataclass() -> None:
    namespace = argparse.Namespace(count=3, level=LogLevel.INFO, note=None)

    assert config.settings_from(Small, namespace) == Small(3, LogLevel.INFO)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"count": 3, "level": LogLevel.INFO, "colour": "red"}, "no field for the settings colour"),
        ({"count": "3", "level": LogLevel.INFO}, "count='3'"),
        ({"count": 3, "level": "INFO"}, "level='INFO'"),
    ],
)
def test_settings_from_names_a_setting_without_field_or_of_the_wrong_type(
    values: dict[str, object], named: str
) -> None:
    """A mistake in a parser's code is named at start-up, not met later as a wrong value."""
    with pytest.raises(TypeError, match=named):
        config.settings_from(Small, argparse.Namespace(**values))

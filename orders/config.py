"""Settings shared by the console scripts: each is a command-line flag whose
default comes from an environment variable of the same name (`--redis-url` and
`ORDERS_REDIS_URL`). Values are checked when the process starts, and a bad or
missing one stops it with one line naming the setting and what it expects.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

DEFAULT_WRITE_ADDRESS = "127.0.0.1:50051"
DEFAULT_READ_ADDRESS = "127.0.0.1:50052"


def env_name(flag: str) -> str:
    return "ORDERS_" + flag.upper().replace("-", "_")


class SettingsParser(argparse.ArgumentParser):
    """An argument parser whose missing required settings are named by flag and variable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.required_settings: dict[str, str] = {}  # dest -> "--flag (or ORDERS_FLAG): help"

    def parse_args(self, args: Sequence[str] | None = None, namespace: None = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args)
        missing = [description for dest, description in self.required_settings.items() if getattr(parsed, dest) is None]
        if missing:
            self.error("missing setting " + "; missing setting ".join(missing))
        return parsed

    def error(self, message: str) -> NoReturn:
        """One line that names the problem, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_setting(
    parser: SettingsParser,
    flag: str,
    help: str,
    *,
    default: Any = None,
    parse: Callable[[str], Any] = str,
) -> None:
    """Adds `--flag`, defaulting to $ORDERS_FLAG, then to `default`; required if neither exists."""
    env = env_name(flag)
    value = os.environ.get(env, default)
    if value is None:
        parser.required_settings[flag.replace("-", "_")] = f"--{flag} (or {env}): {help}"
    shown = "required" if value is None else f"default: {value}"
    parser.add_argument(f"--{flag}", default=value, type=_named(env, parse), help=f"{help} [env {env}; {shown}]")


def _named(env: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wraps a parser so argparse's error names the environment variable as well as the flag."""

    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"({env}) {error}") from None

    wrapped.__name__ = parse.__name__
    return wrapped


def postgres_url(text: str) -> str:
    if urlsplit(text).scheme not in {"postgres", "postgresql"}:
        raise ValueError(f"expected a postgresql://user@host:port/database URL, got {text!r}")
    return text


def redis_url(text: str) -> str:
    if urlsplit(text).scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(f"expected a redis://host:port/db URL, got {text!r}")
    return text


def address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:50051, got {text!r}")
    return text


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"expected a number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"expected an integer > 0, got {text!r}")
    return value


def log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return level


def add_postgres_argument(parser: SettingsParser) -> None:
    add_setting(parser, "postgres-url", "PostgreSQL holding the event store", parse=postgres_url)


def add_redis_arguments(parser: SettingsParser) -> None:
    add_setting(parser, "redis-url", "Redis holding the read views", parse=redis_url)
    add_setting(parser, "redis-prefix", "prefix of every Redis key and channel", default="orders:")


def add_server_arguments(parser: SettingsParser, flag: str, default_address: str) -> None:
    add_setting(parser, flag, "HOST:PORT the gRPC server listens on", default=default_address, parse=address)
    add_setting(
        parser,
        "shutdown-grace",
        "seconds in-flight RPCs get to finish on shutdown",
        default="10",
        parse=positive_float,
    )
    add_setting(
        parser,
        "max-concurrent-rpcs",
        "RPCs served at once; more are refused with RESOURCE_EXHAUSTED",
        default="1000",
        parse=positive_int,
    )


def add_log_argument(parser: SettingsParser) -> None:
    add_setting(parser, "log-level", "DEBUG, INFO, WARNING or ERROR", default="INFO", parse=log_level)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )

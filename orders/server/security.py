"""Transport security and token authentication of the gRPC servers (docs/security.md).

- TLS: the server presents a certificate chain and its private key (PEM files). With a client CA
  as well, mutual TLS: every client must present a certificate that this CA signed, or the
  handshake fails.
- Tokens: a TOML file lists the callers, each with the SHA-256 of its bearer token and its scopes.
  An interceptor reads `authorization: Bearer <token>` from every call's metadata and lets the
  call through only if the token is known and its caller has the scope of the called service.

Everything is read and checked when the process starts (`load_server_tls`, `load_token_table`):
a problem stops it with a message naming the file and, for tokens, the caller.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from orders.config import check_ca, check_key_pair, read_pem
from orders.server.handlers import rebuilt
from orders.server.rpc_errors import ERROR_DOMAIN
from orders.telemetry.logs import current_caller

log = logging.getLogger(__name__)

SCOPES = ("commands", "queries", "admin")
SERVICE_SCOPES: Mapping[str, str] = {
    "orders.v1.OrderCommands": "commands",
    "orders.v1.OrderQueries": "queries",
    "orders.v1.ProjectionAdmin": "admin",
}
# Services any valid token may call, and that --open-services may open to callers without one.
OPENABLE_SERVICES: Mapping[str, tuple[str, ...]] = {
    "health": ("grpc.health.v1.Health",),
    "reflection": ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"),
}
DEFAULT_OPEN_SERVICES = frozenset(OPENABLE_SERVICES)

MISSING_CREDENTIALS = "MISSING_CREDENTIALS"
INVALID_TOKEN = "INVALID_TOKEN"
MISSING_SCOPE = "MISSING_SCOPE"


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_CALLER_KEYS = {"token_sha256", "token", "scopes"}


# ---------------------------------------------------------------------------- files


# ---------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key, and the CA of its clients for mutual TLS."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    certificate_chain: bytes = field(default=b"", repr=False)
    private_key: bytes = field(default=b"", repr=False)
    client_ca: bytes | None = field(default=None, repr=False)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )


def load_server_tls(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> ServerTls:
    """Reads and checks the files (ValueError naming the file otherwise)."""
    chain = read_pem(cert_file, "certificate")
    key = read_pem(key_file, "private key")
    check_key_pair(cert_file, key_file)
    client_ca = None
    if client_ca_file is not None:
        client_ca = read_pem(client_ca_file, "certificate")
        check_ca(client_ca_file)
    return ServerTls(cert_file, key_file, client_ca_file, chain, key, client_ca)


# ---------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class TokenTable:
    """The callers of a tokens file, by the SHA-256 digest of their token."""

    source: Path
    callers: Mapping[bytes, Caller] = field(repr=False)
    plaintext_callers: tuple[str, ...] = ()  # callers given by `token` (development only)

    def authenticate(self, token: str) -> Caller | None:
        """The caller whose token this is, or None. The lookup is by the digest of the presented token:
        how long it takes tells an attacker about digests of their own guesses only, never about a
        stored token, so no constant-time comparison is needed here."""
        return self.callers.get(hashlib.sha256(token.encode()).digest())


def token_sha256(token: str) -> str:
    """The value for `token_sha256` in the tokens file."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_token_table(path: Path) -> TokenTable:
    """Reads and checks a tokens file:

        [callers.web-shop]
        token_sha256 = "<64 hex digits: sha256 of the token>"
        scopes = ["commands", "queries"]

    ValueError, naming the file and the caller, for anything else."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    unknown = set(document) - {"callers"}
    if unknown:
        keys = ", ".join(sorted(unknown))
        raise ValueError(f"{path}: unknown top-level key(s) {keys}; expected [callers.NAME] tables")
    callers = document.get("callers")
    if not isinstance(callers, dict) or not callers:
        raise ValueError(f"{path} defines no callers: add [callers.NAME] tables with token_sha256 and scopes")
    by_digest: dict[bytes, Caller] = {}
    plaintext: list[str] = []
    for name, entry in callers.items():
        digest, scopes, is_plaintext = _caller_entry(path, name, entry)
        if digest in by_digest:
            raise ValueError(f"{path}: callers {by_digest[digest].name!r} and {name!r} have the same token")
        by_digest[digest] = Caller(name, scopes)
        if is_plaintext:
            plaintext.append(name)
    return TokenTable(Path(path), by_digest, tuple(plaintext))


def _caller_entry(path: Path, name: str, entry: object) -> tuple[bytes, frozenset[str], bool]:
    where = f"{path}: caller {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table [callers.{name}] with token_sha256 and scopes")
    unknown = set(entry) - _CALLER_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected token_sha256 and scopes")
    if "token_sha256" in entry and "token" in entry:
        raise ValueError(f"{where}: give token_sha256 or token, not both")
    if "token_sha256" in entry:
        hexdigest = entry["token_sha256"]
        if not isinstance(hexdigest, str) or not _SHA256_HEX.fullmatch(hexdigest):
            raise ValueError(f"{where}: token_sha256 must be 64 hex digits (the SHA-256 of the token)")
        digest, is_plaintext = bytes.fromhex(hexdigest), False
    elif "token" in entry:
        token = entry["token"]
        if not isinstance(token, str) or not token:
            raise ValueError(f"{where}: token must be a non-empty string")
        digest, is_plaintext = hashlib.sha256(token.encode()).digest(), True
    else:
        raise ValueError(f"{where}: missing token_sha256 (the SHA-256 of the caller's token, in hex)")
    if "scopes" not in entry:
        raise ValueError(f"{where}: missing scopes (a list of {', '.join(SCOPES)})")
    scopes = entry["scopes"]
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        raise ValueError(f"{where}: scopes must be a list of strings, of {', '.join(SCOPES)}")
    for scope in scopes:
        if scope not in SCOPES:
            raise ValueError(f"{where}: unknown scope {scope!r}; expected some of {', '.join(SCOPES)}")
    return digest, frozenset(scopes), is_plaintext


def open_service_names(text: str) -> frozenset[str]:
    """The --open-services setting: a comma-separated list of health and reflection (maybe empty)."""
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = names - set(OPENABLE_SERVICES)
    if unknown:
        raise ValueError(f"expected a comma-separated list of {', '.join(OPENABLE_SERVICES)} (or empty), got {text!r}")
    return names


# ---------------------------------------------------------------------------- interceptor


def _refusal_status(code: grpc.StatusCode, reason: str, message: str, **metadata: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[packed]))


_MISSING = _refusal_status(
    grpc.StatusCode.UNAUTHENTICATED,
    MISSING_CREDENTIALS,
    "this server requires a token: send the metadata 'authorization: Bearer <token>' "
    "(orders and orders-admin: --auth-token or ORDERS_AUTH_TOKEN)",
)
_INVALID = _refusal_status(
    grpc.StatusCode.UNAUTHENTICATED,
    INVALID_TOKEN,
    "the bearer token is not known to this server: check it, or ask the operator to add its SHA-256 "
    "to the server's tokens file",
)


def _refusing(handler: grpc.RpcMethodHandler, status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `status`, without decoding
    or reading the request (gRPC needs the kind to answer on the right kind of call)."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    return rebuilt(handler, refuse, decode=False)


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's one `authorization: Bearer <token>` entry, or None."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type hints
    """Lets a call through only with a known bearer token whose caller has the service's scope.

    Health and reflection are open when named in `open_services`; otherwise any valid token may
    call them. A service with no scope in SERVICE_SCOPES is refused to everyone (start_server checks
    that none is registered). The caller's name is in `current_caller` while the call runs."""

    def __init__(self, tokens: TokenTable, open_services: frozenset[str]) -> None:
        self._tokens = tokens
        self._open = {name for group in open_services for name in OPENABLE_SERVICES[group]}
        self._any_caller = {name for names in OPENABLE_SERVICES.values() for name in names}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # not served here: UNIMPLEMENTED
            return None
        method: str = handler_call_details.method
        service = method.split("/")[1] if method.count("/") == 2 else method
        if service in self._open:
            return handler
        token = _bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            log.info("refused %s: no bearer token", method)
            return _refusing(handler, _MISSING)
        caller = self._tokens.authenticate(token)
        if caller is None:
            log.info("refused %s: unknown bearer token", method)
            return _refusing(handler, _INVALID)
        scope = None if service in self._any_caller else SERVICE_SCOPES.get(service, service)
        if scope is not None and scope not in caller.scopes:
            log.info("refused %s to caller %r: no scope %r", method, caller.name, scope)
            message = (
                f"caller {caller.name!r} may not call {service}: that needs the scope {scope!r}; ask the "
                "operator to add it to the caller's scopes in the server's tokens file"
            )
            status = _refusal_status(grpc.StatusCode.PERMISSION_DENIED, MISSING_SCOPE, message, scope=scope)
            return _refusing(handler, status)
        # gRPC runs each call's interceptors and handler in one task of its own, so this value is
        # seen by the handler and by nothing else.
        current_caller.set(caller.name)
        return handler


# ---------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerSecurity:
    """How a server protects its port: TLS (None: plaintext) and tokens (None: no authentication)."""

    tls: ServerTls | None = None
    tokens: TokenTable | None = None
    open_services: frozenset[str] = DEFAULT_OPEN_SERVICES

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.tokens is None else [TokenInterceptor(self.tokens, self.open_services)]

    def check_services(self, service_names: Iterable[str]) -> None:
        """Raises ValueError for a service that token authentication has no scope for."""
        if self.tokens is None:
            return
        unknown = [name for name in service_names if name not in SERVICE_SCOPES]
        if unknown:
            raise ValueError(
                f"no token scope for {', '.join(unknown)}: add it to orders.server.security.SERVICE_SCOPES"
            )

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, self.tls.credentials()))

    def log_summary(self, address: str) -> None:
        """Says, once at start, how `address` is protected, with a warning for each weak spot."""
        if self.tls is None:
            transport = "plaintext"
        else:
            transport = "mutual TLS (client certificates required)" if self.tls.mutual else "TLS"
        if self.tokens is None:
            auth = "no token authentication"
        else:
            opened = ", ".join(sorted(self.open_services)) or "none"
            auth = f"token authentication ({len(self.tokens.callers)} callers; open without a token: {opened})"
        log.info("%s: %s, %s", address, transport, auth)
        if self.tokens is not None and self.tls is None:
            log.warning("%s: token authentication without TLS: tokens travel in clear text", address)
        if self.tokens is not None and self.tokens.plaintext_callers:
            log.warning(
                "%s: caller(s) %s have a plain `token` in %s: for development only; store token_sha256 instead",
                address,
                ", ".join(self.tokens.plaintext_callers),
                self.tokens.source,
            )

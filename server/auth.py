"""Who may reach the server and call what: TLS credentials, the public-address check, and bearer tokens
with scopes, checked by a grpc.aio interceptor.

Tokens come from `tokens_file` (reloaded when the file changes, or on SIGHUP) or from the environment
variable TANDEM_TOKENS, in the same format: one token per line,

    # name       scopes         token (or sha256:<hex digest of the token>)
    frontend     infer,read     8Qm2x-...
    ingest-job   read,write     sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8

Lines that start with # are comments. (TANDEM_TOKENS may also separate entries
with ';'.) Clients send `authorization: Bearer <token>` metadata. docs/security.md is the user's guide.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from .config import ServerConfig

log = logging.getLogger("tandem.server")
Code = grpc.StatusCode

SCOPES = ("infer", "read", "write", "admin")
OPEN = "open"  # no token needed: health probes
ANY = "any"  # any valid token, whatever its scopes
ENV_TOKENS = "TANDEM_TOKENS"
MIN_TOKEN_CHARS = 16
RECHECK_FILE_S = 1.0  # how often a request may look at the token file's mtime

# The scope each RPC needs, by gRPC method path. A method that is not listed needs `admin` (deny by
# default): give every new RPC its line here (tests/server/test_auth.py checks that tandem.v1's are listed).
METHOD_SCOPES: dict[str, str] = {
    "/tandem.v1.Inference/EmbedText": "infer",
    "/tandem.v1.Inference/EmbedImage": "infer",
    "/tandem.v1.Inference/Classify": "infer",
    "/tandem.v1.Models/ListModels": ANY,  # what is served: every client needs it to pick a model
    "/tandem.v1.Models/GetModel": ANY,
    "/tandem.v1.Models/LoadModel": "admin",
    "/tandem.v1.Models/UnloadModel": "admin",
    "/tandem.v1.Collections/Search": "read",
    "/tandem.v1.Collections/Get": "read",
    "/tandem.v1.Collections/ListCollections": "read",
    "/tandem.v1.Collections/GetCollection": "read",
    "/tandem.v1.Collections/Upsert": "write",
    "/tandem.v1.Collections/Delete": "write",
    "/tandem.v1.Collections/CreateCollection": "write",
    "/tandem.v1.Collections/DropCollection": "write",
    "/tandem.v1.Collections/Rebuild": "write",
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ANY,
}

MISSING = ("this server requires a token: send the metadata 'authorization: Bearer <token>' (tandem commands: "
           "--token or TANDEM_TOKEN; Python client: TandemClient(..., token=...))")
MALFORMED = "the 'authorization' metadata must read 'Bearer <token>'"
UNKNOWN = ("the token is not valid on this server (mistyped, revoked, or meant for another server); ask the "
           "server's operator for a token")


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[str]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, where: str) -> dict[bytes, Token]:
    """{sha256 digest of the token: Token} from the token file format. Errors name the line, never the token."""
    tokens: dict[bytes, Token] = {}
    names: set[str] = set()
    entries = re.split(r"[;\n]", text) if where == ENV_TOKENS else text.splitlines()
    for n, line in enumerate(entries, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        at = f"{where}:{n}" if where != ENV_TOKENS else f"{where} entry {n}"
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{at}: expected 'NAME SCOPES TOKEN' (three fields separated by spaces), got "
                             f"{len(parts)} field(s)")
        name, scopes_text, secret = parts
        scopes = frozenset(s for s in scopes_text.split(",") if s)
        if unknown := sorted(scopes - set(SCOPES)):
            raise ValueError(f"{at}: unknown scope(s) {', '.join(map(repr, unknown))} for {name!r}; scopes are "
                             f"{', '.join(SCOPES)}, comma-separated")
        if not scopes:
            raise ValueError(f"{at}: {name!r} has no scopes; give some of {', '.join(SCOPES)}")
        if name in names:
            raise ValueError(f"{at}: the name {name!r} is used twice; names must be unique (they appear in logs "
                             "and error messages instead of the token)")
        if secret.startswith("sha256:"):
            try:
                digest = bytes.fromhex(secret[7:])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"{at}: {name!r}: after 'sha256:' give the 64 hex digits of the token's sha256 "
                                 "(e.g. printf %s TOKEN | sha256sum)")
        elif len(secret) < MIN_TOKEN_CHARS:
            raise ValueError(f"{at}: the token of {name!r} has {len(secret)} characters; use at least "
                             f"{MIN_TOKEN_CHARS} random ones, e.g. from python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'")
        else:
            digest = _digest(secret)
        if digest in tokens:
            raise ValueError(f"{at}: {name!r} has the same token as {tokens[digest].name!r}; give each its own")
        tokens[digest] = Token(name, scopes)
        names.add(name)
    return tokens


class TokenStore:
    """The valid tokens, from a file (reloaded when it changes) or from TANDEM_TOKENS.

    Tokens are kept as sha256 digests and looked up in a dict: the time a lookup takes depends on the
    digest of what was sent, which an attacker cannot steer towards a stored digest without a sha256
    preimage, so it reveals nothing about the tokens (a constant-time compare against each token would
    cost O(tokens) per call for the same guarantee). The token file never has to hold the tokens
    themselves either (sha256:<hex>).
    """

    def __init__(self, path: str | None = None, text: str | None = None):
        self.path = Path(path) if path else None
        self._signature: tuple[int, int, int] | None = None
        self._next_check = 0.0
        if self.path is not None:
            self.tokens = self._read()
        else:
            self.tokens = parse_tokens(text or "", ENV_TOKENS)
        if not self.tokens:
            log.warning("no tokens in %s: every call except health is refused", self.path or ENV_TOKENS)

    @classmethod
    def from_config(cls, config: ServerConfig, env: dict[str, str] | None = None) -> TokenStore | None:
        """The store the configuration asks for, or None when tokens are off."""
        text = (os.environ if env is None else env).get(ENV_TOKENS)
        if config.tokens_file and text is not None:
            raise ValueError(f"both tokens_file ({config.tokens_file}) and {ENV_TOKENS} are set; use one")
        if config.tokens_file:
            return cls(path=config.tokens_file)
        return cls(text=text) if text is not None else None

    def _read(self) -> dict[bytes, Token]:
        assert self.path is not None
        try:
            st = os.stat(self.path)
            text = self.path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read tokens_file {self.path}: {e.strerror}") from None
        self._signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        return parse_tokens(text, str(self.path))

    def reload(self) -> bool:
        """Read the token file again; on an error keep the tokens in use and log why. True when reloaded."""
        if self.path is None:
            log.info("tokens come from %s: restart to change them", ENV_TOKENS)
            return False
        try:
            tokens = self._read()
        except ValueError as e:
            log.error("tokens not reloaded, the previous ones stay in use: %s", e)
            return False
        self.tokens = tokens
        log.info("reloaded %d token(s) from %s", len(tokens), self.path)
        return True

    def _reload_if_changed(self) -> None:
        assert self.path is not None
        self._next_check = time.monotonic() + RECHECK_FILE_S
        try:
            st = os.stat(self.path)
        except OSError:
            return  # mid-replacement (or gone): keep what we have; reload() reports it when asked
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._signature:
            self.reload()

    def authorize(self, metadata: Iterable[tuple[str, str]] | None, need: str, method: str
                  ) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and a message (which never holds the token)."""
        if self.path is not None and time.monotonic() >= self._next_check:
            self._reload_if_changed()
        header = None
        for key, value in metadata or ():  # a loop: half the cost of next(generator)
            if key == "authorization":
                header = value
                break
        if header is None:
            return Code.UNAUTHENTICATED, MISSING
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return Code.UNAUTHENTICATED, MALFORMED
        token = self.tokens.get(_digest(secret))
        if token is None:
            return Code.UNAUTHENTICATED, UNKNOWN
        if need == ANY or need in token.scopes:
            return None
        return Code.PERMISSION_DENIED, (f"the token {token.name!r} (scopes {', '.join(sorted(token.scopes))}) may "
                                        f"not call {method.lstrip('/')}, which needs the scope {need!r}")


def _denying(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that answers `code` without reading the request."""

    async def deny(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kind = (handler.request_streaming, handler.response_streaming) if handler else (False, False)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[kind](deny)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Lets a call through when its bearer token has the scope METHOD_SCOPES asks for."""

    def __init__(self, tokens: TokenStore):
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        need = METHOD_SCOPES.get(details.method, "admin")  # type: ignore[attr-defined]
        if need != OPEN:
            refused = self.tokens.authorize(details.invocation_metadata, need, details.method)  # type: ignore[attr-defined]
            if refused is not None:
                log.debug("refused %s: %s", details.method, refused[0].name)  # type: ignore[attr-defined]
                return _denying(await continuation(details), *refused)
        return await continuation(details)


# -- transport ------------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS from tls_cert/tls_key; with tls_client_ca, clients must present a certificate it signed (mTLS)."""
    if not config.tls_cert:
        return None

    def read(setting: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read {setting} {path}: {e.strerror}") from None

    key, cert = read("tls_key", config.tls_key), read("tls_cert", config.tls_cert)
    client_ca = read("tls_client_ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def check_exposure(config: ServerConfig, tokens: TokenStore | None) -> None:
    """Refuse to listen beyond loopback without TLS and without a way to tell clients apart (tokens or client
    certificates), unless allow_insecure_public says so; then warn."""
    if is_loopback(config.host):
        return
    missing = ([] if config.tls_cert else ["TLS (tls_cert, tls_key)"]) + (
        [] if tokens is not None or config.tls_client_ca else [f"tokens (tokens_file or {ENV_TOKENS})"])
    if not missing:
        return
    what = " or ".join(missing)
    if not config.allow_insecure_public:
        raise ValueError(
            f"refusing to listen on {config.host} without {what}: anyone who can reach port {config.port} could "
            f"call every RPC. Set them up (docs/security.md), listen on 127.0.0.1, or pass --allow-insecure-public "
            "if something else in front of the server does this (a service mesh, a private network)")
    log.warning("listening on %s without %s (allow_insecure_public): anyone who can reach port %d can call every "
                "RPC", config.host, what, config.port)

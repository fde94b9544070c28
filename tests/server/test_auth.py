"""Access control over real localhost gRPC: TLS, mTLS, bearer tokens with scopes, token reload, the
public-address check, reflection off, and the client's and CLI's TLS and token options."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tandem.v1 import tandem_pb2 as pb

from cli import main as tandem
from server import auth
from server.app import TandemServer
from server.client import AsyncTandemClient, TandemClient, Unauthorized, Unavailable
from server.config import ServerConfig
from tests.conftest import ROOT, SHIPPED_MODELS, RunningServer, start_server

# Tokens of the token servers: one per scope, and "reader" for read alone.
SECRETS = {name: f"{name}-secret-{'x' * 16}" for name in ("inferer", "reader", "writer", "admin")}
SCOPE_OF = {"inferer": "infer", "reader": "read", "writer": "write", "admin": "admin"}
TOKENS = "".join(f"{name} {SCOPE_OF[name]} {secret}\n" for name, secret in SECRETS.items())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a second CA's pair."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    files = {"ca": ca.cert_pem, "other_ca": other.cert_pem}
    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")), ("client", ca.issue_cert("client-7")),
                       ("stranger", other.issue_cert("stranger"))):
        files[f"{name}_key"] = cert.private_key_pem
        files[f"{name}_cert"] = cert.cert_chain_pems[0]
    paths = {}
    for name, blob in files.items():
        paths[name] = folder / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def tls_server(pki: dict[str, Path]) -> Iterator[RunningServer]:
    server = start_server(SHIPPED_MODELS, tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                          reflection=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tokens = tmp_path_factory.mktemp("mtls") / "tokens"
    tokens.write_text(TOKENS)
    server = start_server(SHIPPED_MODELS, tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                          tls_client_ca=str(pki["ca"]), tokens_file=str(tokens))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text("# name scopes token\n" + TOKENS)
    return path


@pytest.fixture(scope="module")
def token_server(token_file: Path) -> Iterator[RunningServer]:
    server = start_server(SHIPPED_MODELS, tokens_file=str(token_file))
    yield server
    server.stop()


def health(channel: grpc.Channel, metadata: tuple = ()) -> int:  # type: ignore[type-arg]
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata).status


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


# -- TLS and mTLS --------------------------------------------------------------------------------------------------


def test_tls_serves_a_client_that_trusts_its_ca(tls_server, pki) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(tls_server.target, tls_ca=pki["ca"]) as c:
        assert c.embed_text(["a red circle"]).embeddings.shape[0] == 1
        assert health(c.channel) == health_pb2.HealthCheckResponse.SERVING


def test_tls_server_name_override_checks_the_certificate_against_that_name(tls_server, pki) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(tls_server.target, tls_ca=pki["ca"], tls_server_name="localhost", timeout_s=5) as c:
        assert c.list_models().models
    with TandemClient(tls_server.target, tls_ca=pki["ca"], tls_server_name="elsewhere.example", timeout_s=5) as c,\
            pytest.raises(Unavailable):
        c.list_models()


def test_plaintext_client_fails_against_a_tls_server(tls_server) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(tls_server.target, timeout_s=5) as c, pytest.raises(Unavailable):
        c.list_models()


def test_tls_client_refuses_a_server_signed_by_another_ca(tls_server, pki) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(tls_server.target, tls_ca=pki["other_ca"], timeout_s=5) as c, pytest.raises(Unavailable):
        c.list_models()


def test_reflection_can_be_turned_off(tls_server, pki) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(tls_server.target, tls_ca=pki["ca"]) as c:
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        assert code_of(lambda: list(stub.ServerReflectionInfo(iter([request]), timeout=5))) == \
            grpc.StatusCode.UNIMPLEMENTED


def test_mtls_rejects_a_client_without_a_certificate(mtls_server, pki) -> None:  # type: ignore[no-untyped-def]
    token = SECRETS["inferer"]
    with TandemClient(mtls_server.target, tls_ca=pki["ca"], token=token, timeout_s=5) as c, \
            pytest.raises(Unavailable):
        c.embed_text(["x"])


def test_mtls_rejects_a_certificate_from_another_ca(mtls_server, pki) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(mtls_server.target, tls_ca=pki["ca"], tls_cert=pki["stranger_cert"],
                      tls_key=pki["stranger_key"], token=SECRETS["inferer"], timeout_s=5) as c, \
            pytest.raises(Unavailable):
        c.embed_text(["x"])


def test_async_client_with_client_certificate_and_token(mtls_server, pki) -> None:  # type: ignore[no-untyped-def]
    async def run() -> tuple[int, grpc.StatusCode]:
        async with AsyncTandemClient(mtls_server.target, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                                     tls_key=pki["client_key"], token=SECRETS["inferer"]) as c:
            rows = (await c.embed_text(["a", "b"])).embeddings.shape[0]
            with pytest.raises(Unauthorized) as e:
                await c.list_collections()  # certificate fine, token lacks `read`
            return rows, e.value.code

    assert asyncio.run(run()) == (2, grpc.StatusCode.PERMISSION_DENIED)


# -- tokens --------------------------------------------------------------------------------------------------------


def client(server: RunningServer, name: str | None = None, token: str | None = None) -> TandemClient:
    return TandemClient(server.target, token=token or (SECRETS[name] if name else None), timeout_s=10)


def test_missing_token_is_unauthenticated_and_says_how_to_send_one(token_server) -> None:  # type: ignore[no-untyped-def]
    with client(token_server) as c, pytest.raises(Unauthorized) as e:
        c.embed_text(["x"])
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in e.value.message and "--token" in e.value.message


def test_unknown_token_is_unauthenticated_and_not_echoed(token_server) -> None:  # type: ignore[no-untyped-def]
    guess = "not-a-token-of-this-server-0123456789"
    with client(token_server, token=guess) as c, pytest.raises(Unauthorized) as e:
        c.embed_text(["x"])
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid on this server" in e.value.message and guess not in e.value.message


def test_other_schemes_than_bearer_are_unauthenticated(token_server) -> None:  # type: ignore[no-untyped-def]
    stub = TandemClient(token_server.target).models
    call = lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5,  # noqa: E731
                                   metadata=(("authorization", f"Basic {SECRETS['reader']}"),))
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in e.value.details()


# One RPC of each scope, made by the client: (scope, call).
CALLS = {
    "infer": lambda c: c.embed_text(["x"]),
    "read": lambda c: c.list_collections(),
    "write": lambda c: c.drop_collection("no-such-collection"),  # NOT_FOUND once allowed: nothing changes
}


@pytest.mark.parametrize("scope", sorted(CALLS))
def test_each_scope_allows_its_methods_and_only_those(token_server, scope) -> None:  # type: ignore[no-untyped-def]
    for name, has in SCOPE_OF.items():
        with client(token_server, name) as c:
            try:
                CALLS[scope](c)
                outcome = "ok"
            except Unauthorized as e:
                outcome = e.code.name
                assert SECRETS[name] not in e.message
                assert f"token {name!r}" in e.message and f"needs the scope {scope!r}" in e.message
            except Exception as e:  # past the check: the method's own answer (NOT_FOUND for the drop)
                outcome = "ok" if getattr(e, "code", None) == grpc.StatusCode.NOT_FOUND else repr(e)
        assert outcome == ("ok" if has == scope else "PERMISSION_DENIED"), (name, scope)


def test_unlisted_methods_need_admin(token_server) -> None:  # type: ignore[no-untyped-def]
    """Deny by default: a method missing from METHOD_SCOPES (here one the server lacks) needs `admin`."""
    channel = grpc.insecure_channel(token_server.target)
    call = channel.unary_unary("/tandem.v1.Models/NoSuchMethod")
    for name, want in (("writer", grpc.StatusCode.PERMISSION_DENIED), ("admin", grpc.StatusCode.UNIMPLEMENTED)):
        assert code_of(lambda name=name: call(b"", timeout=5, metadata=(("authorization", f"Bearer {SECRETS[name]}"),))) == want
    channel.close()


def test_every_tandem_method_has_an_explicit_scope() -> None:
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in auth.METHOD_SCOPES, method.full_name


def test_any_valid_token_lists_models(token_server) -> None:  # type: ignore[no-untyped-def]
    for name in SECRETS:
        with client(token_server, name) as c:
            assert c.list_models().models


def test_health_answers_without_a_token(token_server) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(token_server.target) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_a_valid_token(token_server) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(token_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        def services(metadata: tuple = ()) -> list[str]:  # type: ignore[type-arg]
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            answers = stub.ServerReflectionInfo(iter([request]), timeout=5, metadata=metadata)
            return [s.name for a in answers for s in a.list_services_response.service]

        assert code_of(services) == grpc.StatusCode.UNAUTHENTICATED
        assert "tandem.v1.Inference" in services((("authorization", f"Bearer {SECRETS['reader']}"),))


# -- reload ---------------------------------------------------------------------------------------------------------


def replace(path: Path, text: str) -> None:
    """As an operator (or a Kubernetes Secret) should: write aside, then rename over."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for(predicate, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def accepted(server: RunningServer, token: str) -> bool:
    with client(server, token=token) as c:
        try:
            c.list_models()
            return True
        except Unauthorized:
            return False


def test_a_changed_token_file_is_picked_up_without_restart(token_server, token_file) -> None:  # type: ignore[no-untyped-def]
    new = "rotated-token-0123456789abcdef"
    before = token_file.read_text()
    try:
        assert not accepted(token_server, new)
        replace(token_file, f"rotated read {new}\n")
        assert wait_for(lambda: accepted(token_server, new))
        assert not accepted(token_server, SECRETS["reader"])  # left out of the new file: revoked
    finally:
        replace(token_file, before)
        assert wait_for(lambda: accepted(token_server, SECRETS["reader"]))


def test_a_broken_token_file_keeps_the_tokens_in_use(token_server, token_file, caplog) -> None:  # type: ignore[no-untyped-def]
    before = token_file.read_text()
    try:
        replace(token_file, "reader read\n")  # two fields: not a valid line

        async def reload() -> None:
            token_server.server.reload_tokens()

        with caplog.at_level(logging.ERROR, logger="tandem.server"):
            token_server._call(reload())
        assert "tokens not reloaded" in caplog.text and "expected 'NAME SCOPES TOKEN'" in caplog.text
        assert accepted(token_server, SECRETS["reader"])
    finally:
        replace(token_file, before)
        token_server._call(reload())


def test_sighup_reloads_the_token_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A SIGHUP alone: the new file keeps the old one's size, inode and mtime, so only the signal can tell."""
    old, new = "a" * 24, "b" * 24
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops infer {old}\n")
    stamp = tokens.stat().st_mtime_ns
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--models", str(SHIPPED_MODELS), "--port", "0", "--metrics-port", "0",
         "--data-dir", str(tmp_path / "data"), "--tokens-file", str(tokens)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the start-up banner names the port once the server is SERVING
            if found := re.search(r"serving \S+ on (\S+):(\d+)\.", line):
                target = f"127.0.0.1:{found.group(2)}"
                break
        else:
            pytest.fail("the server exited before serving")
        server = type("S", (), {"target": target})()
        assert accepted(server, old) and not accepted(server, new)  # type: ignore[arg-type]
        with open(tokens, "r+") as f:  # same inode and size
            f.write(f"ops infer {new}\n")
        os.utime(tokens, ns=(stamp, stamp))
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: accepted(server, new))  # type: ignore[arg-type]
        assert not accepted(server, old)  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- token file format ----------------------------------------------------------------------------------------------


def test_token_file_entries_may_hold_sha256_digests_instead_of_tokens() -> None:
    import hashlib

    secret = "a-token-kept-only-by-its-owner"
    store = auth.TokenStore(text=f"ci write sha256:{hashlib.sha256(secret.encode()).hexdigest()}")
    md = (("authorization", f"Bearer {secret}"),)
    assert store.authorize(md, "write", "/m") is None
    assert store.authorize(md, "read", "/m")[0] == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[index]


@pytest.mark.parametrize("text, message", [
    ("ci reed 0123456789abcdefXYZ", "unknown scope(s) 'reed'"),
    ("ci read short", "has 5 characters; use at least 16"),
    ("ci read,write", "expected 'NAME SCOPES TOKEN'"),
    ("ci read 0123456789abcdefXYZ\nci write 0123456789abcdefABC", "the name 'ci' is used twice"),
    ("a read 0123456789abcdefXYZ\nb write 0123456789abcdefXYZ", "'b' has the same token as 'a'"),
    ("ci read sha256:abc", "64 hex digits"),
])
def test_token_file_mistakes_name_the_line_and_never_the_token(tmp_path, text, message) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        auth.TokenStore(path=str(path))
    assert f"{path}:" in str(e.value)
    for word in text.split():
        if len(word) >= 5 and word not in ("read", "write", "read,write"):
            assert word not in str(e.value).replace(str(path), "")


def test_tokens_from_the_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = ServerConfig()
    store = auth.TokenStore.from_config(config, {"TANDEM_TOKENS": "a infer 0123456789abcdefXYZ; b read 0123456789abcdefABC"})
    assert store is not None and sorted(t.name for t in store.tokens.values()) == ["a", "b"]
    assert auth.TokenStore.from_config(config, {}) is None
    config.tokens_file = str(tmp_path / "t")
    with pytest.raises(ValueError, match="use one"):
        auth.TokenStore.from_config(config, {"TANDEM_TOKENS": ""})


# -- who may listen where --------------------------------------------------------------------------------------------


def public(tmp_path: Path, **settings: object) -> ServerConfig:
    return ServerConfig(models=str(SHIPPED_MODELS), host="0.0.0.0", port=0, metrics_port=0,
                        data_dir=str(tmp_path / "data"), **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("settings, missing", [
    ({}, "without TLS (tls_cert, tls_key) or tokens"),
    ({"tokens_file": "TOKENS"}, "without TLS (tls_cert, tls_key): anyone"),
    ({"tls": True}, "without tokens (tokens_file or TANDEM_TOKENS): anyone"),
])
def test_public_address_without_tls_or_tokens_refuses_to_start(tmp_path, pki, token_file, settings, missing) -> None:  # type: ignore[no-untyped-def]
    settings = dict(settings)
    if settings.pop("tls", False):
        settings.update(tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]))
    if settings.get("tokens_file"):
        settings["tokens_file"] = str(token_file)
    with pytest.raises(ValueError, match=re.escape(f"refusing to listen on 0.0.0.0 {missing}")) as e:
        TandemServer(public(tmp_path, **settings))
    assert "--allow-insecure-public" in str(e.value)


def test_public_address_with_tls_and_tokens_or_client_certificates_starts(tmp_path, pki, token_file) -> None:  # type: ignore[no-untyped-def]
    tls = {"tls_cert": str(pki["server_cert"]), "tls_key": str(pki["server_key"])}

    async def construct_and_stop(config: ServerConfig) -> None:
        await TandemServer(config).stop(0)

    for extra in ({"tokens_file": str(token_file)}, {"tls_client_ca": str(pki["ca"])}):
        asyncio.run(construct_and_stop(public(tmp_path, **tls, **extra)))


def test_allow_insecure_public_starts_plaintext_and_warns(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="tandem.server"):
        server = RunningServer(public(tmp_path, allow_insecure_public=True))
    try:
        assert "listening on 0.0.0.0 without TLS (tls_cert, tls_key) or tokens" in caplog.text
        with grpc.insecure_channel(server.target) as channel:
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


def test_loopback_addresses_need_nothing() -> None:
    assert all(auth.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(auth.is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "tandem.internal"))


# -- the command line -------------------------------------------------------------------------------------------------


def test_cli_takes_tls_options(tls_server, pki, capsys) -> None:  # type: ignore[no-untyped-def]
    assert tandem(["models", "--server", tls_server.target, "--tls-ca", str(pki["ca"])]) == 0
    assert "(default)" in capsys.readouterr().out
    assert tandem(["models", "--server", tls_server.target, "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_cli_token_from_flag_or_environment(token_server, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TANDEM_TOKEN", raising=False)
    assert tandem(["index", "list", "--server", token_server.target]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert tandem(["index", "list", "--server", token_server.target, "--token", SECRETS["reader"]]) == 0
    monkeypatch.setenv("TANDEM_TOKEN", SECRETS["inferer"])
    assert tandem(["embed", "--server", token_server.target, "--text", "hi"]) == 0
    assert tandem(["index", "list", "--server", token_server.target]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


# -- docs/security.md -------------------------------------------------------------------------------------------------

DOC = (ROOT / "docs" / "security.md").read_text()


def test_the_documented_token_file_is_valid() -> None:
    example = DOC.split("### The token file", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    tokens = auth.parse_tokens(example, "docs/security.md")
    assert {t.name: sorted(t.scopes) for t in tokens.values()} == {
        "frontend": ["infer"], "search-ui": ["infer", "read"], "ingest-job": ["read", "write"],
        "ops": ["admin", "infer", "read", "write"]}


def test_the_documented_scopes_table_is_method_scopes() -> None:
    table = DOC.split("### Scopes", 1)[1].split("\n\n", 2)[1]
    documented = {}
    for row in table.splitlines()[2:]:
        who, methods = (cell.strip() for cell in row.strip("|").split("|"))
        scope = {"any valid token": auth.ANY, "no token": auth.OPEN}.get(who, who.strip("`"))
        for method in re.findall(r"`(\w+/\w+)`", methods):
            documented[method] = scope
    listed = {m.rsplit(".", 1)[-1]: s for m, s in auth.METHOD_SCOPES.items() if m.startswith("/tandem.v1.")}
    assert documented == listed

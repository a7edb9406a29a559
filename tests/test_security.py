"""TLS, mutual TLS and bearer tokens over real sockets, with a throwaway CA made for each test: a TLS router
answers a client with a certificate the CA signed and the token, and refuses plaintext, a client without a
certificate, one signed by another CA, and a missing or wrong token (UNAUTHENTICATED with ErrorInfo); the
HTTPS frontend answers the openai SDK that trusts the CA and gives 401 to a wrong key; and a disaggregated
request crosses separate processes with mutual TLS between every pair of them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dynamo_grpc.cli import build_parser
from dynamo_grpc.client import RouterClient
from dynamo_grpc.config import ConfigError, ServerConfig, server_config
from dynamo_grpc.errors import error_reason
from dynamo_grpc.frontend.backends import EmbeddedRouter
from dynamo_grpc.frontend.http import start_frontend
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.security import Tls, open_channel
from dynamo_grpc.services.server import start_server
from dynamo_grpc.v1 import common_pb2 as pb
from tests.certificates import CertificateAuthority, Identity
from tests.cluster import MODEL, Stubs, deployed, worker_config
from tests.processes import RoleProcess
from tests.test_cli_errors import cli, last_line
from tests.waiting import eventually

TOKEN = "fleet-token-0123456789"


@dataclasses.dataclass
class Pki:
    ca: CertificateAuthority
    fleet: Identity
    client: Identity
    stranger: Identity
    """Signed by another CA."""

    def tls(self, identity: Identity | None = None) -> Tls:
        """Client or server TLS trusting our CA, presenting `identity` (none: no certificate)."""
        return Tls(root_certificates=self.ca.cert,
                   certificate_chain=identity.cert if identity else None,
                   private_key=identity.key if identity else None)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority(tmp_path)
    other = CertificateAuthority(tmp_path, "other-ca")
    return Pki(ca, ca.issue("fleet"), ca.issue("client"), other.issue("stranger"))


@contextlib.asynccontextmanager
async def secured(pki: Pki) -> AsyncIterator[Stubs]:
    """A one-host deployment whose every server is mutual TLS (the router, its workers and the control
    plane, the router's channels presenting the fleet's certificate) and whose router requires TOKEN."""
    config = worker_config()
    config = dataclasses.replace(config, server=ServerConfig(port=0, tls=pki.tls(pki.fleet), auth_token=TOKEN))
    registry = MemoryRegistry()
    try:
        async with deployed(config, registry) as stubs:
            yield stubs
    finally:
        await registry.close()


async def generate(endpoint: str, **options: object) -> list[int]:
    async with RouterClient(endpoint, retries=0, **options) as client:
        result = await client.generate("secret", model=MODEL, max_tokens=8, ignore_eos=True).collect()
    assert result.completion is not None and result.completion.finish_reason == pb.FINISH_REASON_LENGTH
    return result.token_ids


async def refusal(endpoint: str, **options: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await generate(endpoint, **options)
    return failed.value


async def test_mutual_tls_router_answers_only_certified_clients_with_the_token(pki: Pki) -> None:
    async with secured(pki) as stubs:
        router = stubs.deployment.router.endpoint
        # (1) The client certificate, the CA and the token: the request runs through prefill and decode,
        # both reached by the router over mutual TLS.
        async with RouterClient(router, tls=pki.tls(pki.client), token=TOKEN) as client:
            result = await client.generate("secret", model=MODEL, max_tokens=8, ignore_eos=True).collect()
        assert len(result.token_ids) == 8
        assert result.completion.kv_transfer.bytes > 0, "disaggregated: KV came from the prefill worker"

        # (2) Plaintext to the TLS port, and TLS without a client certificate: no connection.
        for options in ({}, {"tls": pki.tls()}):
            failure = await refusal(router, token=TOKEN, **options)
            assert failure.code() == grpc.StatusCode.UNAVAILABLE, (options, failure)
        # (3) A certificate from another CA: refused in the handshake as well.
        failure = await refusal(router, tls=pki.tls(pki.stranger), token=TOKEN)
        assert failure.code() == grpc.StatusCode.UNAVAILABLE
        # (4) The certificate but no token, or a wrong one: UNAUTHENTICATED, saying which.
        for token, reason in ((None, "MISSING_TOKEN"), ("wrong", "BAD_TOKEN"), (TOKEN + "x", "BAD_TOKEN")):
            failure = await refusal(router, tls=pki.tls(pki.client), token=token)
            assert (failure.code(), error_reason(failure)) == (grpc.StatusCode.UNAUTHENTICATED, reason), failure

        # (5) Health checks need the certificate but no token; the workers take no call without a certificate.
        async with open_channel(router, pki.tls(pki.client)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with open_channel(stubs.deployment.decode.endpoint, pki.tls()) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unauthorised:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert unauthorised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_https_frontend_with_an_api_key(pki: Pki) -> None:
    async with secured(pki) as stubs:
        assert stubs.deployment.router.router is not None
        frontend = await start_frontend(EmbeddedRouter(stubs.deployment.router.router),
                                        stubs.deployment.router.registry, host="127.0.0.1", port=0,
                                        tls=pki.tls(pki.fleet), token=TOKEN)
        try:
            assert frontend.url.startswith("https://")
            verified = ssl.create_default_context(cafile=str(pki.ca.cert))
            # (1) The openai SDK trusting the CA, with the key: an answer.
            async with httpx.AsyncClient(verify=verified) as http, openai.AsyncOpenAI(
                    base_url=f"{frontend.url}/v1", api_key=TOKEN, max_retries=0, http_client=http) as client:
                completion = await client.completions.create(model=MODEL, prompt="hello", max_tokens=5,
                                                             extra_body={"ignore_eos": True})
                assert completion.usage.completion_tokens == 5
                # (2) A wrong key: 401 in OpenAI's shape.
                wrong = openai.AsyncOpenAI(base_url=f"{frontend.url}/v1", api_key="wrong", max_retries=0,
                                           http_client=http)
                with pytest.raises(openai.AuthenticationError) as denied:
                    await wrong.completions.create(model=MODEL, prompt="hello", max_tokens=5)
                assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
                # (3) No key: 401 with the challenge; /health and /metrics answer without one.
                bare = await http.get(f"{frontend.url}/v1/models")
                assert (bare.status_code, bare.headers["WWW-Authenticate"]) == (401, "Bearer")
                assert bare.json()["error"]["code"] == "invalid_api_key"
                for path in ("/health", "/metrics"):
                    assert (await http.get(f"{frontend.url}{path}")).status_code == 200, path
            # (4) A client that does not trust the CA never gets to send the key.
            async with httpx.AsyncClient() as untrusting:
                with pytest.raises(httpx.ConnectError):
                    await untrusting.get(f"{frontend.url}/health")
        finally:
            await frontend.stop()


async def test_reflection_can_be_turned_off() -> None:
    async def services(reflection: bool) -> grpc.StatusCode:
        server = await start_server([], host="127.0.0.1", port=0, reflection=reflection)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                try:
                    [response async for response in call]
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK
        finally:
            await server.stop(0)

    assert await services(True) == grpc.StatusCode.OK
    assert await services(False) == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.slow
async def test_disaggregated_request_across_processes_with_mutual_tls_everywhere(
        etcd, pki: Pki, tmp_path: Path) -> None:
    """etcd, control plane, prefill, decode, router and an HTTPS frontend as separate processes, each with
    its own certificate from the CA and requiring the others'; KV moves by gRPC pulls (over mutual TLS)."""
    token_file = tmp_path / "router.token"
    token_file.write_text(TOKEN + "\n")
    key_file = tmp_path / "api.key"
    key_file.write_text("api-key-for-users")
    common = ("--etcd", etcd.endpoint, "--namespace", "tls", "--lease-ttl-s", "2")
    engine = ("--engine", "simulated", "--decode-step-s", "0.002", "--model", MODEL, "--kv-transports", "grpc")
    identities = {role: pki.ca.issue(role) for role in ("control-plane", "prefill", "decode", "router", "frontend")}

    def role(name: str, *args: str) -> RoleProcess:
        return RoleProcess(name, *common, *identities[name].flags(pki.ca.cert), *args, log_dir=tmp_path,
                           tls=pki.tls(pki.client))

    procs = [role("control-plane"), role("prefill", *engine), role("decode", *engine),
             router := role("router", "--auth-token-file", str(token_file))]
    try:
        await asyncio.gather(*(proc.wait_serving() for proc in procs))
        # The frontend's --port (RoleProcess's) is its HTTPS port.
        procs.append(frontend := RoleProcess(
            "frontend", *common, *identities["frontend"].flags(pki.ca.cert), "--router", router.endpoint,
            "--router-token-file", str(token_file), "--auth-token-file", str(key_file), log_dir=tmp_path))
        # (1) The router over mutual TLS with the token: the KV moved from prefill to decode by gRPC.
        async with RouterClient(router.endpoint, tls=pki.tls(pki.client), token=TOKEN) as client:
            result = await client.generate("across processes", model=MODEL, max_tokens=8, ignore_eos=True).collect()
        assert len(result.token_ids) == 8
        assert (result.completion.kv_transfer.path, result.completion.kv_transfer.bytes > 0) == ("grpc", True)

        # (2) The openai SDK through the HTTPS frontend, which reaches the router over mutual TLS with the
        # router's token; a wrong key gets 401.
        verified = ssl.create_default_context(cafile=str(pki.ca.cert))
        url = f"https://{frontend.endpoint}"
        async with httpx.AsyncClient(verify=verified) as http:
            async def healthy() -> bool:
                assert frontend.proc.poll() is None, frontend.log()
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get(f"{url}/health")).status_code == 200
                return False

            await eventually(healthy, 30, "the HTTPS frontend")
            assert (await http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
                    ).status_code == 401, "the router's token is not the API key"
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="api-key-for-users", max_retries=0,
                                          http_client=http) as client:
                completion = await client.completions.create(model=MODEL, prompt="over https", max_tokens=6,
                                                             extra_body={"ignore_eos": True})
            assert completion.usage.completion_tokens == 6
    finally:
        for proc in procs:
            proc.stop()


@pytest.mark.slow
async def test_serve_wires_tls_and_the_token_into_its_own_pieces(pki: Pki, tmp_path: Path) -> None:
    """`serve --prompt` with mutual TLS and a token: its router, workers and control plane serve mutual TLS,
    and its own client presents the certificate and the token."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    status, out, err = await cli("serve", "--engine", "simulated", "--model", MODEL, "--port", "0",
                                 "--http-port", "0", *pki.fleet.flags(pki.ca.cert), "--auth-token-file",
                                 str(token_file), "--no-reflection", "--prompt", "hello", "--max-tokens", "4")
    assert status == 0, err
    assert out.endswith("\n") and "[1 prompt" not in out, out
    assert "4 completion tokens" in err and "KV moved" in err, err


async def test_tls_and_token_flags_are_checked_at_start_up(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = {
        ("--tls-cert", str(pki.fleet.cert)): "--tls-cert and --tls-key go together",
        ("--tls-cert", str(pki.fleet.cert), "--tls-key", str(pki.client.key)):
            "not a PEM certificate chain and its private key",
        ("--tls-cert", str(missing), "--tls-key", str(pki.fleet.key)): "No such file or directory",
        (*pki.fleet.flags(None), "--tls-ca", str(pki.fleet.key)): f"--tls-ca {pki.fleet.key}: not a PEM CA",
        ("--auth-token-file", str(missing)): f"--auth-token-file {missing}: No such file or directory",
        ("--auth-token-file", str(empty)): "the file holds no token",
    }
    for flags, problem in cases.items():
        with pytest.raises(ConfigError, match=re.escape(problem)):
            server_config(build_parser().parse_args(["router", *flags]))
    tls = server_config(build_parser().parse_args(["router", *pki.fleet.flags(pki.ca.cert)])).tls
    assert tls == Tls(str(pki.ca.cert), str(pki.fleet.cert), str(pki.fleet.key)) and tls.mutual
    # As the user sees it: one line naming the flag, exit status 2.
    status, _, err = await cli("router", "--etcd", "127.0.0.1:1", "--tls-ca", str(pki.ca.cert))
    assert status == 2
    assert last_line(err).startswith("dynamo-grpc router: --tls-ca needs --tls-cert and --tls-key"), err


async def test_plaintext_beyond_loopback_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    warnings = []
    for host in ("127.0.0.1", "0.0.0.0"):
        caplog.clear()
        server = await start_server([], host=host, port=0)
        await server.stop(0)
        warnings.append([r.getMessage() for r in caplog.records if r.levelname == "WARNING"])
    assert warnings[0] == []
    assert len(warnings[1]) == 1 and "plaintext and open to anyone who reaches it" in warnings[1][0], warnings

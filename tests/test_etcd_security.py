"""etcd over TLS with credentials: only a worker identity can put a worker into the fleet.

Each etcd here serves TLS with a certificate from a throwaway CA, and `dynamo-grpc etcd-setup-auth` gives it
the roles of docs/security.md and turns authentication on, with auth tokens that expire after 2 s idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest
from etcd3aio import Etcd3Client

from dynamo_grpc import cli
from dynamo_grpc.client import GenerateResult, RouterClient
from dynamo_grpc.config import ConfigError, etcd_access, server_config
from dynamo_grpc.registry import EtcdAccess, EtcdRegistry, RegistryAccessDenied, RegistryUnavailable
from dynamo_grpc.registry.setup_auth import CONTROL_PLANE_ROLE, READER_ROLE, WORKER_ROLE, setup_auth
from dynamo_grpc.v1 import common_pb2 as pb
from tests.etcd_server import EtcdServer
from tests.processes import REPO, RoleProcess
from tests.test_e2e_processes import ENGINE_FLAGS, MODEL, eventually
from tests.throwaway_ca import ThrowawayCA

pytestmark = pytest.mark.etcd

NS = "secured"
TOKEN_TTL_S = 2


@dataclass
class SecuredEtcd:
    server: EtcdServer
    ca: ThrowawayCA
    password_dir: Path

    def access(self, user: str = "") -> EtcdAccess:
        password = (self.password_dir / f"{user}.password").read_text().strip() if user else ""
        return EtcdAccess(ca=str(self.ca.ca_path), user=user, password=password)

    def registry(self, user: str) -> EtcdRegistry:
        return EtcdRegistry([self.server.endpoint], namespace=NS, access=self.access(user))

    def flags(self, user: str) -> tuple[str, ...]:
        """A role's command-line flags for `user`: the password comes from its file, not the command line."""
        return ("--etcd", self.server.endpoint, "--namespace", NS, "--etcd-ca", str(self.ca.ca_path),
                "--etcd-user", user, "--etcd-password-file", str(self.password_dir / f"{user}.password"))


@pytest.fixture
def ca(tmp_path: Path) -> ThrowawayCA:
    return ThrowawayCA(tmp_path / "ca")


@pytest.fixture
def secured(tmp_path: Path, ca: ThrowawayCA) -> Iterator[SecuredEtcd]:
    """A TLS etcd whose authentication `dynamo-grpc etcd-setup-auth` (the command) turned on."""
    server = EtcdServer(tmp_path / "secured-etcd", ca=ca, auth_token_ttl_s=TOKEN_TTL_S)
    server.start()
    try:
        password_dir = tmp_path / "passwords"
        command = [sys.executable, "-m", "dynamo_grpc.cli", "etcd-setup-auth", "--etcd", server.endpoint,
                   "--etcd-ca", str(ca.ca_path), "--namespace", NS, "--password-dir", str(password_dir)]
        setup = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                               text=True, timeout=60, check=False)
        assert setup.returncode == 0, setup.stderr
        assert sorted(p.name for p in password_dir.iterdir()) == sorted(
            f"{user}.password" for user in ("root", WORKER_ROLE, READER_ROLE, CONTROL_PLANE_ROLE))
        assert all((p.stat().st_mode & 0o777) == 0o600 for p in password_dir.iterdir())
        yield SecuredEtcd(server, ca, password_dir)
    finally:
        server.stop()


def worker(worker_id: str, role: int = pb.WORKER_ROLE_DECODE) -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=worker_id, role=role, endpoint="127.0.0.1:1", model=MODEL)


async def worker_ids(registry: EtcdRegistry) -> list[str]:
    return [w.worker_id for w in await registry.list_workers()]


async def test_workers_register_over_tls_across_token_expiry_and_an_etcd_restart(
        secured: SecuredEtcd, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dynamo_grpc.registry.etcd")
    async with secured.registry(WORKER_ROLE) as workers, secured.registry(READER_ROLE) as reader:
        await workers.register(worker("decode-a"))
        updates = reader.watch_workers()
        assert set(await anext(updates)) == {"decode-a"}

        # Idle past --auth-token-ttl: etcd forgets both tokens; the next calls authenticate again.
        await asyncio.sleep(TOKEN_TTL_S + 1.5)
        await workers.register(worker("decode-b"))
        assert await worker_ids(reader) == ["decode-a", "decode-b"]
        assert "authenticating again as dynamo-worker" in caplog.text
        assert "authenticating again as dynamo-reader" in caplog.text
        assert set(await anext(updates)) == {"decode-a", "decode-b"}

        # etcd restarts and forgets every token; the watch lists again and the lease keeps both workers.
        secured.server.restart()
        await workers.register(worker("decode-c"))
        seen = await asyncio.wait_for(anext(updates), 15)
        while set(seen) != {"decode-a", "decode-b", "decode-c"}:
            seen = await asyncio.wait_for(anext(updates), 15)
        await updates.aclose()


async def test_a_reader_cannot_put_a_worker_into_the_fleet(secured: SecuredEtcd) -> None:
    async with secured.registry(WORKER_ROLE) as workers, secured.registry(READER_ROLE) as rogue:
        await workers.register(worker("decode-real"))
        with pytest.raises(RegistryAccessDenied) as refused:
            await rogue.register(worker("decode-rogue"))
        message = str(refused.value)
        assert f"'{READER_ROLE}' may not write /dynamo-grpc/{NS}/workers/decode/decode-rogue" in message
        assert f"the {WORKER_ROLE} role" in message
        # A worker identity cannot write the control plane's documents either.
        with pytest.raises(RegistryAccessDenied, match=f"the {CONTROL_PLANE_ROLE} role"):
            await workers.put_document("pairings", b"forged")
        assert await worker_ids(rogue) == ["decode-real"]

    # Nor can a process writing to etcd directly, without credentials.
    async with Etcd3Client([secured.server.endpoint], ca_cert=secured.ca.ca_path.read_bytes()) as raw:
        assert raw.kv is not None
        with pytest.raises(grpc.aio.AioRpcError) as raw_refused:
            await raw.kv.put(f"/dynamo-grpc/{NS}/workers/decode/raw", worker("raw").SerializeToString())
        assert "user name is empty" in (raw_refused.value.details() or "")
    async with secured.registry(CONTROL_PLANE_ROLE) as control_plane:
        assert await worker_ids(control_plane) == []  # the real one left with its registry


async def test_refusals_say_what_to_change(secured: SecuredEtcd, etcd: EtcdServer, tmp_path: Path) -> None:
    endpoint = [secured.server.endpoint]

    async def refusal(access: EtcdAccess, endpoints: list[str] = endpoint) -> str:
        with pytest.raises(RegistryUnavailable) as raised:
            async with EtcdRegistry(endpoints, namespace=NS, access=access, connect_timeout_s=1.0):
                pass
        return str(raised.value)

    assert "if it serves https, pass --etcd-ca" in await refusal(EtcdAccess())
    stranger = ThrowawayCA(tmp_path / "stranger", "stranger")
    assert "TLS handshake failed" in await refusal(EtcdAccess(ca=str(stranger.ca_path)))
    assert "requires authentication: pass --etcd-user" in await refusal(secured.access())
    wrong = EtcdAccess(ca=str(secured.ca.ca_path), user=WORKER_ROLE, password="not-it")
    assert f"refused user '{WORKER_ROLE}': wrong user name or password" in await refusal(wrong)
    # Credentials for an etcd that checks none: refused, not silently ignored.
    assert "has authentication off" in await refusal(EtcdAccess(user="u", password="p"), [etcd.endpoint])


async def test_client_certificates_name_the_etcd_user(tmp_path: Path, ca: ThrowawayCA) -> None:
    def identity(user: str) -> EtcdAccess:
        cert, key = ca.client(user)
        return EtcdAccess(ca=str(ca.ca_path), cert=str(cert), key=str(key))

    with EtcdServer(tmp_path / "etcd", ca=ca, client_cert_auth=True) as server:
        written = await setup_auth([server.endpoint], identity("root"), namespace=NS,
                                   password_dir=tmp_path / "passwords")
        assert WORKER_ROLE in written
        async with EtcdRegistry([server.endpoint], namespace=NS, access=identity(WORKER_ROLE)) as workers:
            await workers.register(worker("decode-cert"))
            async with EtcdRegistry([server.endpoint], namespace=NS, access=identity(READER_ROLE)) as reader:
                assert await worker_ids(reader) == ["decode-cert"]
                with pytest.raises(RegistryAccessDenied, match=f"the {WORKER_ROLE} role"):
                    await reader.register(worker("decode-rogue"))
        with pytest.raises(RegistryUnavailable, match="TLS handshake failed"):
            async with EtcdRegistry([server.endpoint], namespace=NS, access=EtcdAccess(ca=str(ca.ca_path)),
                                    connect_timeout_s=1.0):
                pass
        # Authentication is on now: another namespace's roles need root, here root's certificate.
        with pytest.raises(RegistryUnavailable, match="permission denied"):
            await setup_auth([server.endpoint], identity(READER_ROLE), namespace="second",
                             password_dir=tmp_path / "passwords")
        again = await setup_auth([server.endpoint], identity("root"), namespace="second",
                                 password_dir=tmp_path / "passwords")
        assert sorted(again) == sorted([WORKER_ROLE, READER_ROLE, CONTROL_PLANE_ROLE])


def test_etcd_flags_are_checked_before_anything_starts(tmp_path: Path) -> None:
    cases = {
        ("--etcd-cert", str(tmp_path / "c.pem")): "--etcd-cert and --etcd-key go together",
        ("--etcd-user", "dynamo-worker"): "needs its password: --etcd-password-file PATH or the "
                                          "DYNAMO_GRPC_ETCD_PASSWORD environment variable",
        ("--etcd-ca", str(tmp_path / "missing.crt")): "no such readable file",
        ("--etcd-user", "u", "--etcd-password-file", str(tmp_path / "none")): "--etcd-password-file",
    }
    for flags, expected in cases.items():
        args = cli.build_parser().parse_args(["router", "--etcd", "127.0.0.1:1", *flags])
        with pytest.raises(ConfigError) as refused:
            server_config(args)
        assert expected in str(refused.value)


def test_processes_started_by_serve_and_up_reach_etcd_the_same_way(monkeypatch: pytest.MonkeyPatch,
                                                                   ca: ThrowawayCA, tmp_path: Path) -> None:
    """`serve` and `up` hand their etcd settings to the processes they start as DYNAMO_GRPC_ETCD_* variables,
    which those read as their flags' defaults: the password never appears on a command line."""
    cert, key = ca.client(WORKER_ROLE)
    password_file = tmp_path / "worker.password"
    password_file.write_text("s3cret\n")
    parent_args = cli.build_parser().parse_args([
        "up", "spec.yaml", "--etcd-ca", str(ca.ca_path), "--etcd-cert", str(cert), "--etcd-key", str(key),
        "--etcd-user", WORKER_ROLE, "--etcd-password-file", str(password_file)])
    parent = etcd_access(parent_args)
    assert parent.password == "s3cret" and "s3cret" not in repr(parent)
    for name, value in parent.environment().items():
        monkeypatch.setenv(name, value)
    child_args = cli.build_parser().parse_args(["decode", "--etcd", "127.0.0.1:2379"])
    assert server_config(child_args).etcd_access == parent


@pytest.fixture
async def secured_fleet(secured: SecuredEtcd, tmp_path: Path) -> AsyncIterator[dict[str, RoleProcess]]:
    lease = ("--lease-ttl-s", "2")
    procs = {
        "control-plane": RoleProcess("control-plane", *secured.flags(CONTROL_PLANE_ROLE), log_dir=tmp_path),
        **{role: RoleProcess(role, *secured.flags(WORKER_ROLE), *lease, *ENGINE_FLAGS, log_dir=tmp_path)
           for role in ("prefill", "decode")},
        "router": RoleProcess("router", *secured.flags(READER_ROLE), log_dir=tmp_path),
    }
    try:
        await asyncio.gather(*(p.wait_serving() for p in procs.values()))
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.mark.slow
async def test_a_fleet_over_tls_with_credentials_routes_only_to_real_workers(
        secured: SecuredEtcd, secured_fleet: dict[str, RoleProcess], tmp_path: Path) -> None:
    frontend = RoleProcess("frontend", *secured.flags(READER_ROLE), log_dir=tmp_path)
    # A rogue decode worker with a reader's credentials, and one with none: both refused, by name.
    rogue = RoleProcess("decode", *secured.flags(READER_ROLE), *ENGINE_FLAGS, log_dir=tmp_path)
    anonymous = RoleProcess("decode", "--etcd", secured.server.endpoint, "--namespace", NS, "--etcd-ca",
                            str(secured.ca.ca_path), *ENGINE_FLAGS, log_dir=tmp_path)
    # And a router that does not trust etcd's CA.
    untrusting = RoleProcess("router", "--etcd", secured.server.endpoint, "--namespace", NS, log_dir=tmp_path)
    try:
        assert rogue.wait_exit(30) == 1, rogue.log()
        assert f"may not write /dynamo-grpc/{NS}/workers/decode/" in rogue.log()
        assert f"the {WORKER_ROLE} role" in rogue.log()
        assert anonymous.wait_exit(30) == 1, anonymous.log()
        assert "requires authentication" in anonymous.log()
        assert untrusting.wait_exit(30) == 1, untrusting.log()
        assert "pass --etcd-ca" in untrusting.log()

        async with secured.registry(READER_ROLE) as reader:
            registered = {w.role: w.worker_id for w in await reader.list_workers()}
        assert set(registered) == {pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE}

        async with RouterClient(secured_fleet["router"].endpoint) as client:
            async def request(prompt: str) -> GenerateResult:
                return await client.generate(prompt, model=MODEL, max_tokens=4, ignore_eos=True).collect()

            async def disaggregated() -> bool:
                return (await request("over tls")).completion.kv_transfer.bytes > 0
            await eventually(disaggregated, what="a disaggregated request through the secured fleet")
            results = [await request(f"prompt {i}") for i in range(30)]
        assert {r.completion.decode_worker_id for r in results} == {registered[pb.WORKER_ROLE_DECODE]}
        assert {r.completion.prefill_worker_id for r in results} == {registered[pb.WORKER_ROLE_PREFILL]}

        url = f"http://{frontend.endpoint}"

        async def completes() -> bool:
            assert frontend.proc.poll() is None, frontend.log()
            body = {"model": MODEL, "prompt": "through the frontend", "max_tokens": 4, "ignore_eos": True}
            try:
                async with aiohttp.ClientSession() as session, \
                        session.post(f"{url}/v1/completions", json=body) as response:
                    usage = (await response.json()).get("usage", {}) if response.status == 200 else {}
                    return usage.get("completion_tokens") == 4
            except aiohttp.ClientError:
                return False
        await eventually(completes, timeout_s=30, what="a completion through the secured frontend")
    finally:
        for proc in (frontend, rogue, anonymous, untrusting):
            proc.stop()

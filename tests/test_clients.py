"""The clients in clients/ (TypeScript, Go, C++, and the Python example async and sync), each built from its
sources the way clients/README.md says and run against a live `dynamo-grpc serve --engine simulated`: they
stream the greedy tokens `dynamo_grpc.client` gets, cancel in-band, name a refusal's ErrorInfo reason, and
give a request its deadline. Builds reuse what an earlier run left in the clients' ignored build folders."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynamo_grpc.client import GenerateResult, RouterClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a cold C++ build takes minutes on two busy cores

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sim-tiny"
PROMPT = "Hello from every language"
TOKENS = 24
MANY_TOKENS = 2000
"""With ignore_eos and DECODE_STEP_S a step, 40 s of generation: a cancel or a deadline must end it first."""
DECODE_STEP_S = 0.02
CANCEL_AFTER = 5
BUILD_TIMEOUT_S = 540
RUN_TIMEOUT_S = 60
SUMMARY = re.compile(r"^\[(\d+) prompt \+ (\d+) completion tokens, finish: (FINISH_REASON_\w+)\]$",
                     re.MULTILINE)
TOKEN_IDS = re.compile(r"^token ids:((?: \d+)*)$", re.MULTILINE)


@dataclass(frozen=True)
class Client:
    builds: tuple[tuple[str, ...], ...]
    """Commands run at the repository root, as clients/README.md gives them (minus the one-off npm ci)."""
    command: tuple[str, ...]
    needs: str = ""
    """A path that scripts/setup.sh makes, without which the build cannot start."""


CLIENTS = {
    "typescript": Client(builds=(("npm", "run", "--prefix", "clients/typescript", "build"),),
                         command=("node", "clients/typescript/dist/generate.js"),
                         needs="clients/typescript/node_modules"),
    "go": Client(builds=(("bash", "clients/go/build.sh"),), command=("clients/go/build/dynamo-generate",)),
    "cpp": Client(builds=(("cmake", "-S", "clients/cpp", "-B", "clients/cpp/build"),
                          ("cmake", "--build", "clients/cpp/build", "-j", "2")),
                  command=("clients/cpp/build/dynamo-generate",)),
    "python": Client(builds=(), command=(sys.executable, "clients/python/generate.py")),
    "python-sync": Client(builds=(), command=(sys.executable, "clients/python/generate.py", "--sync")),
}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def summary(self) -> tuple[int, int, str]:
        found = SUMMARY.search(self.stderr)
        assert found, self.stderr
        return int(found[1]), int(found[2]), found[3]

    def token_ids(self) -> list[int]:
        found = TOKEN_IDS.search(self.stderr)
        assert found, self.stderr
        return [int(token) for token in found[1].split()]


class Server:
    """`dynamo-grpc serve` with the simulated engine on free ports, its stderr drained as it comes."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMO_GRPC_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo_grpc.cli", "serve", "--engine", "simulated", "--model", MODEL,
             "--port", "0", "--http-port", "0", "--decode-step-s", str(DECODE_STEP_S)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.log: list[str] = []
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def router_endpoint(self, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, "serve exited:\n" + "".join(self.log)
                continue
            self.log.append(line)
            found = re.search(r"send requests to RouterService at (\S+)", line)
            if found:
                return found[1]
        raise AssertionError(f"serve did not say where its router is within {timeout_s:g} s:\n"
                             + "".join(self.log))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._drainer.join(timeout=10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def router() -> Iterator[str]:
    server = Server()
    try:
        yield server.router_endpoint()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(router: str) -> GenerateResult:
    """What the Python client gets for the prompt, greedy: the tokens every client must print."""
    async def collect() -> GenerateResult:
        async with RouterClient(router) as client:
            return await client.generate(PROMPT, model=MODEL, max_tokens=TOKENS, ignore_eos=True).collect()

    result = asyncio.run(collect())
    assert len(result.token_ids) == TOKENS and result.text
    return result


@pytest.fixture(scope="module", params=list(CLIENTS))
def client(request: pytest.FixtureRequest) -> Client:
    """The client, built (incrementally: a rebuild with nothing changed takes seconds)."""
    built = CLIENTS[request.param]
    if built.needs:
        assert (ROOT / built.needs).exists(), f"{built.needs} is missing: run bash scripts/setup.sh"
    for command in built.builds:
        started = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                              check=False)
        assert done.returncode == 0, (f"{' '.join(command)} failed:\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        print(f"{request.param}: {' '.join(command)} took {time.monotonic() - started:.1f} s")
    return built


def run(client: Client, router: str, *args: str) -> Run:
    started = time.monotonic()
    done = subprocess.run([*client.command, "--router", router, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, check=False)
    return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def test_streams_the_greedy_tokens_the_python_client_gets(client: Client, router: str,
                                                          reference: GenerateResult) -> None:
    result = run(client, router, "--model", MODEL, "--max-tokens", str(TOKENS), "--ignore-eos", "--token-ids",
                 PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference.text + "\n"
    assert result.token_ids() == reference.token_ids
    assert reference.completion is not None
    assert result.summary() == (reference.completion.usage.prompt_tokens, TOKENS, "FINISH_REASON_LENGTH")


def test_cancel_after_n_tokens_ends_the_stream_early(client: Client, router: str,
                                                     reference: GenerateResult) -> None:
    result = run(client, router, "--model", MODEL, "--max-tokens", str(MANY_TOKENS), "--ignore-eos",
                 "--token-ids", "--cancel-after", str(CANCEL_AFTER), PROMPT)
    assert result.returncode == 0, result.stderr
    _, completion_tokens, finish = result.summary()
    assert finish == "FINISH_REASON_CANCELLED"
    assert CANCEL_AFTER <= completion_tokens < MANY_TOKENS
    printed = result.token_ids()
    assert CANCEL_AFTER <= len(printed) <= completion_tokens
    assert printed[:CANCEL_AFTER] == reference.token_ids[:CANCEL_AFTER]
    assert result.seconds < MANY_TOKENS * DECODE_STEP_S / 2, f"the stream ran {result.seconds:.1f} s"


def test_a_refused_request_names_its_error_info_reason(client: Client, router: str) -> None:
    result = run(client, router, "--model", "no-such-model", PROMPT)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "NOT_FOUND MODEL_NOT_FOUND: model 'no-such-model' is not served" in result.stderr, result.stderr


def test_a_deadline_ends_the_request_with_deadline_exceeded(client: Client, router: str) -> None:
    result = run(client, router, "--model", MODEL, "--max-tokens", str(MANY_TOKENS), "--ignore-eos",
                 "--timeout-s", "1", PROMPT)
    assert result.returncode == 1
    # Passed mid-stream, or, on a machine slow to start the client, before the router got the request.
    expired = r"DEADLINE_EXCEEDED: the request's deadline (passed before it finished|has already passed)"
    assert re.search(expired, result.stderr), result.stderr
    assert result.seconds < MANY_TOKENS * DECODE_STEP_S / 2

"""The README's main job, run the way a user meets it: `dynamo-grpc serve --prompt ...` on a machine where
nothing is built yet, so the command builds the tiny model, starts a real disaggregated vLLM-CPU
deployment, answers, and stops."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dynamo_grpc.cli import DEFAULT_ROUTER_PORT

PROMPT = "Hello, disaggregated world"
MAX_TOKENS = 32  # serve's default, as the README's command runs it
RUN_BUDGET_S = 360
"""Build + two engine starts + the answer + shutdown: 1.5 to 4 minutes on two busy CPU cores."""
SHUTDOWN_BUDGET_S = 30
"""From the summary line to exit: both engines stop side by side and their processes exit on their own
(10 to 25 s on two busy CPU cores, most of it Python's final garbage collection in each process)."""

SUMMARY = re.compile(r"^\[(\d+) prompt \+ (\d+) completion tokens, finish: FINISH_REASON_LENGTH, "
                     r"KV moved: (\d+) bytes from prefill-\S+ via shm\]$", re.MULTILINE)


def _command() -> list[str]:
    """The console script of the Python running the tests (a virtualenv's bin comes first), else PATH's."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("dynamo-grpc", path=search)
    return [script] if script else [sys.executable, "-m", "dynamo_grpc.cli"]


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _fresh_user_env(home: Path) -> dict[str, str]:
    """An empty HOME and none of the settings that would point the command at an existing model or cache."""
    dropped = {"DYNAMO_GRPC_MODEL_DIR", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "HF_HOME",
               "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM"}
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("DYNAMO_GRPC_")}
    return {**env, "HOME": str(home)}


class _Run:
    """A child process whose stdout and stderr are read as they come, each line with the time it arrived."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.stdout = b""
        self.stderr: list[tuple[float, str]] = []
        self._readers = [threading.Thread(target=self._read_stdout), threading.Thread(target=self._read_stderr)]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout as stream:
            self.stdout = stream.read()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr as stream:
            for line in stream:
                self.stderr.append((time.monotonic(), line.decode(errors="replace").rstrip("\n")))

    def wait(self, timeout: float) -> tuple[int, float]:
        """The exit code and when the process ended; the whole process group is killed on a timeout."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        finally:
            for reader in self._readers:
                reader.join()
        return code, time.monotonic()

    @property
    def stderr_text(self) -> str:
        return "\n".join(line for _, line in self.stderr)


def _greedy_answer(model_dir: Path) -> str:
    """What HF transformers generates greedily for the prompt: what the deployment must print."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def _hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(RUN_BUDGET_S + 60)
def test_readme_command_answers_on_a_fresh_machine(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    argv = [*_command(), "serve", "--prompt", PROMPT]
    if not _port_is_free(DEFAULT_ROUTER_PORT):
        # Another server on this machine holds the router's default port; any free port shows the same.
        argv += ["--port", "0"]
    run = _Run(argv, _fresh_user_env(home))
    code, ended = run.wait(timeout=RUN_BUDGET_S)
    stderr = run.stderr_text

    # (1) It succeeded, quietly: no traceback, no engine killed on the way out.
    assert code == 0, stderr[-5000:]
    assert "Traceback" not in stderr and "force killing" not in stderr, stderr[-5000:]
    assert "dynamo-grpc serve: building the tiny model" in stderr
    # (2) It built the model itself, in the user's cache, complete and the same as every other build.
    built = home / ".cache" / "dynamo-grpc" / "tiny-llama"
    assert _hashes(built) == _hashes(tiny_model_dir)
    # (3) stdout is the answer and nothing else: greedy, so exactly what HF transformers generates.
    assert run.stdout.decode() == _greedy_answer(built) + "\n"
    # (4) The summary line is on stderr: 32 tokens, the prompt's KV moved from the prefill worker.
    summary = SUMMARY.search(stderr)
    assert summary, stderr[-5000:]
    assert int(summary[2]) == MAX_TOKENS and int(summary[3]) > 0
    # (5) Quiet by default: no INFO logs of ours, and none of the warnings vLLM-CPU and torch give at every
    #     start (vLLM's own log lines, deprecations, NUMA binding).
    noise = re.compile(r" INFO | WARNING \d\d-\d\d |FutureWarning|DeprecationWarning|NUMA binding")
    assert not [line for _, line in run.stderr if noise.search(line)], stderr[-5000:]
    # (6) The whole run ended within RUN_BUDGET_S (the wait above), and the stop after the answer in seconds.
    summary_at = next(at for at, line in run.stderr if SUMMARY.match(line))
    assert ended - summary_at < SHUTDOWN_BUDGET_S, f"stopping took {ended - summary_at:.1f} s"


@pytest.mark.timeout(60)
def test_prompt_answer_is_alone_on_stdout_with_the_simulated_engine(tmp_path: Path) -> None:
    # Any free port: this checks which stream carries what, not the README's exact command.
    done = subprocess.run([*_command(), "serve", "--engine", "simulated", "--port", "0", "--max-tokens", "8",
                           "--prompt", PROMPT], env=_fresh_user_env(tmp_path), capture_output=True, text=True,
                          timeout=50, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    answer, newline, rest = done.stdout.partition("\n")
    assert answer and newline and not rest, done.stdout
    assert re.search(r"^\[\d+ prompt \+ 8 completion tokens, finish: FINISH_REASON_LENGTH", done.stderr, re.MULTILINE)
    assert "send requests to RouterService" not in done.stderr
    assert " INFO " not in done.stderr and "Traceback" not in done.stderr, done.stderr

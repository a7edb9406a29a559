"""The README's main job: `dynamo-grpc serve --prompt ...` runs a real disaggregated vLLM-CPU deployment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(300)]


def test_serve_answers_a_prompt_through_prefill_and_decode(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DYNAMO_GRPC_MODEL_DIR": str(tiny_model_dir), "VLLM_CACHE_ROOT": str(tmp_path / "vllm")}
    done = subprocess.run([sys.executable, "-m", "dynamo_grpc.cli", "serve", "--port", "0", "--max-tokens", "8",
                           "--prompt", "Hello, disaggregated world"], env=env, capture_output=True, text=True,
                          timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "serving 'tiny-llama'" in done.stdout
    summary = re.search(r"\[(\d+) prompt \+ (\d+) completion tokens, finish: FINISH_REASON_LENGTH, "
                        r"KV moved: (\d+) bytes from prefill-\S+ via shm\]", done.stdout)
    assert summary, done.stdout
    assert int(summary[2]) == 8 and int(summary[3]) > 0
    assert "Traceback" not in done.stderr and "Task was destroyed" not in done.stderr

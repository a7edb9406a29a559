"""The stack-overhead benchmark at toy size: every mode must serve every request in full (timings unchecked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench" / "stack_overhead.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stack_overhead", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_every_mode_completes_every_request_with_all_its_tokens() -> None:
    bench = load_bench()
    table = await bench.experiment_a(concurrencies=[2], requests=4, rounds=1, input_tokens=32, output_tokens=8,
                                     progress=False)
    rows = table[2]
    assert set(rows) == set(bench.SIMULATED_MODES)
    for mode, row in rows.items():
        assert (row["requests"], row["failed"], row["wrong_token_count"]) == (4, 0, 0), (mode, row["errors"])
        assert row["requests_per_s"] > 0 and row["ttft_p50_ms"] > 0, mode
    rendered = bench.render_table(table, "direct")
    assert all(mode in rendered for mode in bench.SIMULATED_MODES)

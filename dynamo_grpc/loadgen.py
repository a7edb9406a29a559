"""A load generator for a deployment: fixed concurrency or Poisson arrivals, and the numbers that matter.

Per request it records when it was sent, when each token batch arrived and when it ended, and from that
reports TTFT, ITL (gap between tokens), TPOT (mean time per output token after the first), end-to-end
latency, tokens/s, requests/s and goodput: requests/s that met both the TTFT and the ITL objective.
Prompts are token ids, so input lengths are exact; a shared-prefix workload starts prompts of the
same group with the same tokens, which prefix caches can reuse.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dynamo_grpc.client import RouterClient
from dynamo_grpc.errors import describe
from dynamo_grpc.slo import Objectives


@dataclass(frozen=True)
class Lengths:
    """Token counts: a fixed value, or drawn from uniform:LO:HI or normal:MEAN:STD (clipped at 1)."""

    spec: str

    def __post_init__(self) -> None:
        self.draw(random.Random(0))  # fail on a bad spec before any request is sent

    def draw(self, rng: random.Random) -> int:
        kind, _, args = self.spec.partition(":")
        try:
            if not args:
                value = int(kind)
            elif kind == "uniform":
                low, high = (int(a) for a in args.split(":"))
                value = rng.randint(low, high)
            elif kind == "normal":
                mean, std = (float(a) for a in args.split(":"))
                value = round(rng.gauss(mean, std))
            else:
                raise ValueError(kind)
        except ValueError:
            raise ValueError(f"bad length {self.spec!r}: use N, uniform:LO:HI or normal:MEAN:STD") from None
        return max(1, value)


@dataclass(frozen=True)
class Workload:
    requests: int = 100
    input_tokens: Lengths = Lengths("512")
    output_tokens: Lengths = Lengths("64")
    concurrency: int = 8
    """Requests in flight at once; ignored when `rate` is set."""
    rate: float = 0.0
    """Poisson arrivals per second; 0 means closed-loop at `concurrency`."""
    shared_prefix_tokens: int = 0
    prefix_groups: int = 1
    vocab: tuple[int, int] = (10, 250)
    """Token ids are drawn from this range (the simulated engine's vocabulary is bytes)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1 or self.prefix_groups < 1:
            raise ValueError("requests, concurrency and prefix groups must be at least 1")
        if self.rate < 0 or self.shared_prefix_tokens < 0:
            raise ValueError("rate and shared prefix tokens must not be negative")

    def prompts(self) -> list[tuple[list[int], int]]:
        """(prompt token ids, output tokens) per request, the same for the same seed."""
        rng = random.Random(self.seed)
        low, high = self.vocab
        prefixes = [[rng.randint(low, high) for _ in range(self.shared_prefix_tokens)]
                    for _ in range(self.prefix_groups)]
        result = []
        for _ in range(self.requests):
            length = self.input_tokens.draw(rng)
            prefix = rng.choice(prefixes)[:length]
            prompt = prefix + [rng.randint(low, high) for _ in range(length - len(prefix))]
            result.append((prompt, self.output_tokens.draw(rng)))
        return result


@dataclass
class RequestRecord:
    input_tokens: int
    sent: float
    token_times: list[float] = field(default_factory=list)
    """Arrival time of each output token (tokens of one batch share its arrival time)."""
    ended: float = 0.0
    error: str = ""

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    def meets(self, objectives: Objectives) -> bool:
        return (not self.error and self.ttft is not None and self.ttft * 1e3 <= objectives.ttft_ms
                and (self.tpot is None or self.tpot * 1e3 <= objectives.itl_ms))


Sender = Callable[[list[int], int, RequestRecord], Any]
"""Sends one request and fills the record's token times; an awaitable."""


def router_sender(client: RouterClient, model: str) -> Sender:
    async def send(prompt: list[int], max_tokens: int, record: RequestRecord) -> None:
        stream = client.generate(prompt, model=model, max_tokens=max_tokens, ignore_eos=True)
        async for response in stream:
            if response.HasField("tokens"):
                now = time.perf_counter()
                record.token_times += [now] * len(response.tokens.token_ids)
    return send


def openai_sender(base_url: str, model: str, session: Any) -> Sender:
    """Streams /v1/completions from any OpenAI-compatible server (ours or vLLM's) at `base_url`.

    `session` is an aiohttp.ClientSession. Tokens are counted by each chunk's `token_ids` (asked for with
    `return_token_ids`, which both servers honour), because one chunk may carry several tokens.
    """
    url = base_url.rstrip("/") + "/v1/completions"

    async def send(prompt: list[int], max_tokens: int, record: RequestRecord) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        async with session.post(url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error'].get('message', chunk['error'])}")
                now = time.perf_counter()
                for choice in chunk.get("choices") or ():
                    record.token_times += [now] * len(choice.get("token_ids") or ())
    return send


async def run_load(send: Sender, workload: Workload, *, progress: bool = True,
                   clock: Callable[[], float] = time.perf_counter) -> list[RequestRecord]:
    """Send the workload's requests; closed-loop at `concurrency`, or open-loop at `rate`."""
    jobs = workload.prompts()
    records: list[RequestRecord] = []
    done = 0
    arrivals = random.Random(workload.seed + 1)
    slots = asyncio.Semaphore(workload.concurrency if not workload.rate else len(jobs))

    async def one(prompt: list[int], max_tokens: int) -> None:
        nonlocal done
        async with slots:
            record = RequestRecord(len(prompt), clock())
            records.append(record)
            try:
                await send(prompt, max_tokens, record)
            except grpc.aio.AioRpcError as error:
                record.error = describe(error)[:300]
            except Exception as error:  # noqa: BLE001 - a failed request is counted, not fatal to the run
                record.error = f"{type(error).__name__}: {error}"[:200]
            record.ended = clock()
            done += 1
            if progress and (done % max(1, len(jobs) // 20) == 0 or done == len(jobs)):
                print(f"\r  {done}/{len(jobs)} requests", end="", file=sys.stderr, flush=True)

    tasks = []
    for prompt, max_tokens in jobs:
        tasks.append(asyncio.ensure_future(one(prompt, max_tokens)))
        if workload.rate:
            await asyncio.sleep(arrivals.expovariate(workload.rate))
    await asyncio.gather(*tasks)
    if progress:
        print(file=sys.stderr)
    return records


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered) * 1e3}


def summarize(records: list[RequestRecord], objectives: Objectives) -> dict[str, Any]:
    """Latencies in ms, throughput per second, over the wall time of the run."""
    ok = [r for r in records if not r.error]
    span = max(r.ended for r in records) - min(r.sent for r in records)
    itls = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    output_tokens = sum(len(r.token_times) for r in ok)
    return {
        "requests": len(records), "failed": len(records) - len(ok), "duration_s": span,
        "ttft_ms": _percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": _percentiles(itls),
        "tpot_ms": _percentiles([r.tpot for r in ok if r.tpot is not None]),
        "e2e_ms": _percentiles([r.ended - r.sent for r in ok]),
        "requests_per_s": len(ok) / span, "output_tokens_per_s": output_tokens / span,
        "input_tokens_per_s": sum(r.input_tokens for r in ok) / span,
        "goodput_requests_per_s": sum(r.meets(objectives) for r in records) / span,
        "slo_attainment": sum(r.meets(objectives) for r in records) / len(records),
        "objectives": asdict(objectives),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def render(summary: dict[str, Any]) -> str:
    lines = [(f"{summary['requests']} requests ({summary['failed']} failed) in {summary['duration_s']:.1f} s: "
              f"{summary['requests_per_s']:.2f} req/s, {summary['output_tokens_per_s']:.1f} output tok/s, "
              f"goodput {summary['goodput_requests_per_s']:.2f} req/s (TTFT <= "
              f"{summary['objectives']['ttft_ms']:g} ms and ITL <= {summary['objectives']['itl_ms']:g} ms)")]
    for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        p = summary[name]
        if p:
            lines.append(f"  {name[:-3].upper():<5} p50 {p['p50']:9.1f}  p90 {p['p90']:9.1f}  p99 {p['p99']:9.1f}  ms")
    lines += [f"  error: {e}" for e in summary["errors"]]
    return "\n".join(lines)


def write_outputs(records: list[RequestRecord], summary: dict[str, Any], *, json_path: Path | None,
                  plot_path: Path | None) -> None:
    if json_path is not None:
        start = min(r.sent for r in records)
        json_path.write_text(json.dumps({"summary": summary, "requests": [
            {"input_tokens": r.input_tokens, "sent_s": r.sent - start, "ttft_ms": (r.ttft or 0) * 1e3,
             "output_tokens": len(r.token_times), "e2e_ms": (r.ended - r.sent) * 1e3, "error": r.error}
            for r in records]}, indent=1))
    if plot_path is not None:
        plot(records, summary, plot_path)


def plot(records: list[RequestRecord], summary: dict[str, Any], path: Path) -> None:
    """TTFT over the run and the ITL distribution, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    ok = [r for r in records if r.ttft is not None]
    start = min(r.sent for r in records)
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4))
    left.scatter([r.sent - start for r in ok], [r.ttft * 1e3 for r in ok], s=6)
    left.axhline(summary["objectives"]["ttft_ms"], color="red", linestyle="--", label="TTFT objective")
    left.set(xlabel="request sent at (s)", ylabel="TTFT (ms)", title="Time to first token")
    left.legend()
    itls = sorted((b - a) * 1e3 for r in ok for a, b in zip(r.token_times, r.token_times[1:]))
    if itls:
        right.plot(itls, [i / len(itls) for i in range(1, len(itls) + 1)])
        right.axvline(summary["objectives"]["itl_ms"], color="red", linestyle="--", label="ITL objective")
        right.legend()
    right.set(xlabel="inter-token latency (ms)", ylabel="fraction of gaps", title="ITL distribution")
    figure.suptitle(f"{summary['requests_per_s']:.2f} req/s, goodput {summary['goodput_requests_per_s']:.2f} req/s")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)

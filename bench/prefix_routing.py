"""Prefix-aware routing against load-only routing on a shared-prefix workload (simulated H100s, Llama-3-8B).

Each request is one of 64 shared 2048-token prefixes (system prompts, documents) plus its own 128-token
question, and asks for 128 tokens; Poisson arrivals. A GPU's prefix cache holds the KV its memory holds
(`--kv-gb`, 8 GB = about 29 prefixes), so no worker can keep every prefix and where a request lands
decides whether its prefix is recomputed. The same fleet and arrivals run under each routing policy,
side by side; runs are on a virtual clock (`dynamo_grpc.fleetsim`), so they are deterministic.

    python bench/prefix_routing.py [--rates 60 90 120] [--requests 1200]
"""

from __future__ import annotations

import argparse
import time

from dynamo_grpc.config import ROUTING_POLICIES
from dynamo_grpc.fleetsim import FleetShape, run_fleet, run_virtual
from dynamo_grpc.loadgen import Lengths, Workload, summarize
from dynamo_grpc.slo import Objectives

PREFIXES, PREFIX_TOKENS, QUESTION_TOKENS, OUTPUT_TOKENS = 64, 2048, 128, 128


def ratio(by_policy: dict[str, float], other: str) -> str:
    """kv_aware's value over another policy's."""
    return f"{by_policy['kv_aware'] / by_policy[other]:.2f}x" if by_policy[other] else "inf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[60.0, 90.0, 120.0], help="requests/s")
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--kv-gb", type=float, default=8.0, help="KV memory per GPU")
    parser.add_argument("--ttft-ms", type=float, default=300.0)
    parser.add_argument("--itl-ms", type=float, default=30.0)
    args = parser.parse_args()
    objectives = Objectives(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms)
    fleets = [FleetShape(prefill_workers=3, decode_workers=5), FleetShape(decode_workers=8)]
    print(f"Llama-3-8B, 8 simulated H100s, {PREFIXES} prefixes x {PREFIX_TOKENS} tokens + {QUESTION_TOKENS} "
          f"per request, OSL {OUTPUT_TOKENS}, {args.kv_gb:g} GB KV per GPU; goodput: TTFT <= {args.ttft_ms:g} ms "
          f"and ITL <= {args.itl_ms:g} ms")
    print(f"{'fleet':<18} {'rate':>5} {'policy':<13} {'hit rate':>8} {'TTFT p50':>9} {'TTFT p90':>9} "
          f"{'ITL mean':>8} {'goodput':>8}")
    started = time.process_time()
    for fleet in fleets:
        for rate in args.rates:
            workload = Workload(requests=args.requests, rate=rate, seed=1,
                                input_tokens=Lengths(str(PREFIX_TOKENS + QUESTION_TOKENS)),
                                output_tokens=Lengths(str(OUTPUT_TOKENS)),
                                shared_prefix_tokens=PREFIX_TOKENS, prefix_groups=PREFIXES)
            goodput: dict[str, float] = {}
            ttft_p90: dict[str, float] = {}
            for policy in ROUTING_POLICIES:
                shape = FleetShape(prefill_workers=fleet.prefill_workers, decode_workers=fleet.decode_workers,
                                   routing=policy)
                run = run_virtual(run_fleet(shape, workload, model="llama3_8b", kv_memory_gb=args.kv_gb))
                summary = summarize(run.records, objectives)
                goodput[policy] = summary["goodput_requests_per_s"]
                ttft_p90[policy] = summary["ttft_ms"]["p90"]
                name = f"{fleet.prefill_workers}P+{fleet.decode_workers}D" if fleet.prefill_workers else \
                    f"agg {fleet.decode_workers}"
                print(f"{name:<18} {rate:>5g} {policy:<13} {run.prefix_hit_rate:>8.2f} "
                      f"{summary['ttft_ms']['p50']:>7.0f}ms {summary['ttft_ms']['p90']:>7.0f}ms "
                      f"{summary['itl_ms']['mean']:>6.1f}ms {goodput[policy]:>8.1f}", flush=True)
            for other in ROUTING_POLICIES:
                if other != "kv_aware":
                    print(f"{'':<18} {'':>5} kv_aware/{other}: goodput {ratio(goodput, other)}, "
                          f"TTFT p90 {ratio(ttft_p90, other)}")
    print(f"({time.process_time() - started:.0f} s of CPU)")


if __name__ == "__main__":
    main()

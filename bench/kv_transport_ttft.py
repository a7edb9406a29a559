"""Time to first token of one disaggregated request by KV transport and link, on simulated H100s.

The seed's two-node case: Llama-3-8B (128 KiB of KV per token), a 3,000-token prompt (384 MB of KV), one
prefill and one decode worker, one request at a time. Steps are priced by the calibrated cost model; the
KV transfer by `cost_model.transfer_ms` (the lower of the transport's and the link's bandwidth). Runs on
a virtual clock (`dynamo_grpc.fleetsim`), so the result does not depend on this machine.

The last column is a model, not a run: the TTFT a layer-by-layer overlap would give, where the decode
worker pulls each layer's KV while the prefill computes the next ones, so all but the last layer's share
of the transfer hides behind the prefill's compute (our workers do not overlap yet: docs/experiments.md §5).

    python bench/kv_transport_ttft.py
"""

from __future__ import annotations

import argparse
import statistics

from dynamo_grpc.engine.cost_model import KV_BYTES_PER_TOKEN, MODEL_SHAPES, transfer_ms
from dynamo_grpc.fleetsim import FleetShape, run_virtual, simulate
from dynamo_grpc.loadgen import Lengths, Workload

MODEL = "llama3_8b"
CASES = (  # (what it is, transport, link)
    ("one node: NIXL over NVLink", "nixl", "nvlink"),
    ("one node: shared memory through the host", "shm", "pcie5_host"),
    ("two nodes: NIXL over 400G RDMA", "nixl", "rdma_400g"),
    ("two nodes: gRPC over 100G TCP", "grpc", "tcp_100g"),
    ("two nodes: gRPC over 10G TCP", "grpc", "tcp_10g"),
)


def ttft_ms(transport: str, link: str, prompt_tokens: int, requests: int) -> float:
    shape = FleetShape(decode_workers=1, prefill_workers=1, link=link, transport=transport)
    workload = Workload(requests=requests, input_tokens=Lengths(str(prompt_tokens)),
                        output_tokens=Lengths("8"),
                        concurrency=1, seed=1)
    records = run_virtual(simulate(shape, workload, model=MODEL))
    return statistics.median(r.ttft for r in records if r.ttft is not None) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=3,
                        help="requests, one at a time (the median is shown)")
    args = parser.parse_args()
    nbytes = args.prompt_tokens * KV_BYTES_PER_TOKEN[MODEL]
    layers = MODEL_SHAPES[MODEL].layers
    print(f"{MODEL}, {args.prompt_tokens}-token prompt: {nbytes / 1e6:.0f} MB of KV; "
          "1 prefill + 1 decode worker")
    rows = [(label, transfer_ms(nbytes, link, transport),
             ttft_ms(transport, link, args.prompt_tokens, args.requests))
            for label, transport, link in CASES]
    # What is not transfer (prefill, first decode step, hops): at most this hides behind compute.
    compute = min(ttft - transfer for _, transfer, ttft in rows)
    print(f"| {'case':42s} | transfer | TTFT | TTFT, overlapped by layer (model) |\n|---|---|---|---|")
    for label, transfer, ttft in rows:
        overlapped = ttft - min(transfer * (layers - 1) / layers, compute)
        print(f"| {label:42s} | {transfer:6.0f} ms | {ttft:4.0f} ms | {overlapped:4.0f} ms |")

if __name__ == "__main__":
    main()

"""Pool plans for a 70B-shaped model, ISL 3000 / OSL 150, TTFT <= 2 s and ITL <= 100 ms, at a few rates.

Each plan is found by the SLA planner (`control_plane.planner.plan_pools`): a cost-model estimate, then
simulated fleets on a virtual clock. The spec YAML of the cheapest disaggregated fleet at the last rate
follows, ready for `dynamo-grpc compile`. About 10-30 s of CPU per rate.

    python bench/plan_example.py [--rates 2 5 10] [--itl-ms 100] [--ttft-ms 2000] [--tp 1]

`--tp 4 8` lets the planner choose the tensor parallel size too (the same for both pools); an ITL below
the ~52 ms one-GPU decode floor needs it, e.g. `--itl-ms 30 --tp 1 2 4 8`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from control_plane.planner import PlannerWorkload, plan_pools, pool_plan_to_spec
from control_plane.spec import dump_spec
from dynamo_grpc.slo import Objectives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    parser.add_argument("--ttft-ms", type=float, default=2000.0)
    parser.add_argument("--itl-ms", type=float, default=100.0)
    parser.add_argument("--tp", type=int, nargs="+", default=[1], help="tensor parallel sizes to choose from")
    args = parser.parse_args()
    objectives = Objectives(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms)
    plan = None
    for rate in args.rates:
        started = time.process_time()
        plan = plan_pools("llama3_70b", PlannerWorkload(isl=3000, osl=150, rate=rate), objectives,
                          tp_options=tuple(args.tp))
        print(plan.render())
        print(f"  ({time.process_time() - started:.0f} s of CPU)\n", flush=True)
    if plan is not None and plan.disaggregated is not None:
        disaggregated = dataclasses.replace(plan, chosen=plan.disaggregated)
        gpus_per_node = 8
        nodes = -(-disaggregated.gpus // gpus_per_node)
        hosts = [(f"node-{i}", f"10.0.0.{i + 1}", gpus_per_node) for i in range(nodes)]
        spec = pool_plan_to_spec(disaggregated, model_path="/models/llama-3-70b", served_name="llama-3-70b",
                                 hosts=hosts, etcd="10.0.0.1:2379", name="llama-70b-planned")
        print(f"# the cheapest disaggregated fleet at {plan.workload.rate:g} req/s")
        print(dump_spec(spec), end="")


if __name__ == "__main__":
    main()

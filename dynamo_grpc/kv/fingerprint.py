"""What to tell the operator when a KV transfer's engine fingerprint is not the puller's."""

from __future__ import annotations


def mismatch_hint(produced: str, wanted: str) -> str:
    """The advice for KV from an engine with fingerprint `produced` reaching one with `wanted`:
    tensor-parallel sizes that differ get their own, since the rest of the model may well agree."""
    produced_engine, _, produced_tp = produced.rpartition("/")
    wanted_engine, _, wanted_tp = wanted.rpartition("/")
    if produced_engine == wanted_engine and produced_tp.startswith("tp") and wanted_tp.startswith("tp"):
        return (f"The engines differ in tensor parallelism only ({produced_tp} vs {wanted_tp}): KV moves only "
                "between equal tensor-parallel sizes (it is not re-sharded between them); give prefill and "
                "decode workers the same --tensor-parallel-size.")
    return "Pair only workers with the same engine fingerprint."

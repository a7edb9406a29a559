"""How long one engine step takes on an H100, fitted to measured step times.

The simulated engine needs step times that react to batching the way a GPU does: a step costs a
floor no matter how little it carries (every weight is read once), long prefill chunks are
compute-bound, decodes pay for the KV cache they read, and a prefill chunk sharing a step with decodes
stretches that step for all of them. `StepCostModel` captures those effects with a handful of
coefficients fitted per model shape to `calibration/h100_llama_step_grid.json` (see the README there).

Every measurement is of one GPU. `TensorParallelStepCost` prices a step of an engine whose model is split
over N GPUs (tensor parallel, TP) from the one-GPU fit plus the all-reduces TP adds; its communication
terms come from published NVLink and all-reduce figures, not from this calibration.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION_DIR = Path(__file__).parent / "calibration"
GRID_FILE = CALIBRATION_DIR / "h100_llama_step_grid.json"
STEP_TIMES_FILE = CALIBRATION_DIR / "h100_llama_step_times.json"

SHAPES = ("llama3_8b", "llama3_70b")

# bf16 K and V for every layer: 2 x layers x kv_heads x head_dim x 2 bytes.
KV_BYTES_PER_TOKEN = {"llama3_8b": 131072, "llama3_70b": 327680}

# Assumed sustained bandwidths (GB/s, 1e9 bytes) for moving KV between workers. The host links are
# measured on the calibration H100 (pinned host->device 45, device->host 52); the rest are nominal
# line rates less protocol overhead, not measurements.
LINK_GBPS = {
    "nvlink": 450.0,  # H100 NVLink 4, one direction
    "pcie5_host": 45.0,  # pinned host->device copy, the slower direction
    "rdma_400g": 50.0,  # 400 Gb/s InfiniBand / RoCE
    "tcp_100g": 12.0,  # 100 Gb/s Ethernet
    "tcp_10g": 1.2,  # 10 Gb/s Ethernet
}

# What each KV transport's own path sustains (GB/s), whatever the link under it: a transfer runs at the lower
# of its transport's figure and its link's. NIXL hands the NIC (GPUDirect RDMA) or NVLink the GPU's memory, so
# only the link bounds it. The other two move every byte through host memory and Python:
# - shm, one host: the GPU cache is copied into a shared-memory segment and out again, measured on the
#   calibration H100 at 2.65 GB/s (save) and 4.48 GB/s (load) (docs/experiments.md section 7): 1.66 in series;
# - grpc: PullKv streams through Python on both ends, measured by bench/kv_transfer.py (N streams, 384 MiB) at
#   the figure below on this 2-core shared CPU box; a faster host does better, never link rate.
TRANSPORT_GBPS = {
    "nixl": math.inf,
    "shm": 1.66,
    "grpc": 1.0,
}

# GEMMs process tokens in tiles: a step with 520 tokens costs about what one with 576 does.
GEMM_TILE_TOKENS = 64


@dataclass(frozen=True)
class ModelShape:
    """What tensor parallelism splits, and what it has to hold, for one calibrated shape."""

    layers: int
    hidden: int
    kv_heads: int
    weight_gb: float
    """bf16 weights (1e9 bytes) of the real model: 2 bytes x its parameter count."""


# Llama 3 architecture (the calibration README); parameter counts as Hugging Face reports them for the
# released checkpoints: 8.03 B and 70.6 B. The calibration's 70B shape is a 70B-shaped model whose weights
# fit one device (8 of its 80 layers timed, scaled x10); the real one's 141 GB do not fit an 80 GB H100.
MODEL_SHAPES = {
    "llama3_8b": ModelShape(layers=32, hidden=4096, kv_heads=8, weight_gb=16.1),
    "llama3_70b": ModelShape(layers=80, hidden=8192, kv_heads=8, weight_gb=141.1),
}

GPU_MEMORY_GB = 80.0
"""HBM of one H100 SXM (the calibration device, "H100 80GB HBM3")."""

# --- Tensor parallel communication (a model from published figures, not measured here) ---------------
# Megatron-style TP all-reduces the activations twice per transformer layer (after attention, after the
# MLP): tokens in the step x hidden x 2 bytes (bf16) each.
ALLREDUCES_PER_LAYER = 2
ACTIVATION_BYTES = 2
ALLREDUCE_BUS_GBPS = 370.0
"""Ring all-reduce bus bandwidth over NVLink 4 (GB/s, 1e9 bytes). NVLink 4 on an H100 SXM is 900 GB/s
in total, 450 GB/s per direction (NVIDIA's line rate; NVIDIA/nccl#1264 measures 380 of those 450 one way
with p2pBandwidthLatencyTest). NCCL's ring reaches ~370 GB/s bus bandwidth after ~20% protocol
overhead, and NVLink SHARP ~480 GB/s on 8 GPUs at large sizes (NCCL maintainer, NVIDIA/nccl-tests#212);
8xH100 nccl-tests runs report 360-480 GB/s. 370 is the ring figure: no SHARP assumed."""
ALLREDUCE_LATENCY_US = 10.0
"""Fixed time of one all-reduce, whatever its size. vLLM's custom all-reduce on H100 takes 8.5-12 us
for 512 B-32 KiB messages at TP 2, 4 and 8 (sgl-project/sglang#2904, timed without CUDA graphs).
Mid-size messages run slower than latency + bytes / bus bandwidth predicts: the same table has 1 MiB
(a 64-sequence decode of the 70B) at 27-45 us where this model gives 11-13 us, so TP decode steps at
large batches are priced optimistically by up to ~5 ms for the 70B."""


def allreduce_ms(nbytes: float, ranks: int, *, bus_gbps: float = ALLREDUCE_BUS_GBPS,
                 latency_us: float = ALLREDUCE_LATENCY_US) -> float:
    """One ring all-reduce of `nbytes` over `ranks` GPUs: a fixed latency plus 2(N-1)/N of the bytes over
    the bus bandwidth (nccl-tests' definition of bus bandwidth); nothing on one GPU."""
    if ranks == 1:
        return 0.0
    return latency_us / 1e3 + 2.0 * (ranks - 1) / ranks * nbytes / (bus_gbps * 1e9) * 1e3


def check_tensor_parallel_size(shape: str, size: int) -> None:
    """Refuse a TP size this model cannot price: it must split the KV heads evenly (1, 2, 4 or 8 for
    Llama 3); past 8 the KV heads would be replicated, which the even split does not describe."""
    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    heads = MODEL_SHAPES[shape].kv_heads
    allowed = [n for n in range(1, heads + 1) if heads % n == 0]
    if size not in allowed:
        raise ValueError(f"tensor parallel size {size} cannot be priced for {shape}: it must divide its {heads} "
                         f"KV heads ({', '.join(map(str, allowed))})")


def transfer_ms(nbytes: int, link: str, transport: str = "nixl") -> float:
    """Time to move `nbytes` by a KV transport over a named link, at the lower of their bandwidths (no
    latency, no contention)."""
    if link not in LINK_GBPS:
        raise ValueError(f"unknown link {link!r}; known: {', '.join(sorted(LINK_GBPS))}")
    if transport not in TRANSPORT_GBPS:
        raise ValueError(f"unknown KV transport {transport!r}; known: {', '.join(TRANSPORT_GBPS)}")
    if nbytes < 0:
        raise ValueError(f"nbytes must not be negative, got {nbytes}")
    return nbytes / (min(LINK_GBPS[link], TRANSPORT_GBPS[transport]) * 1e9) * 1e3


@dataclass(frozen=True)
class StepCostModel:
    """Fitted coefficients for one model shape; `step_ms` turns a step's contents into milliseconds.

    A step carries at most one prefill chunk (`prefill_tokens` new tokens after `prefill_context`
    already-cached ones) and `decode_batch` decodes that together attend to `decode_context_total`
    cached tokens. Its time is the sum of:

    - GEMMs: a smooth max of the weight-read floor and compute time, which grows with the tokens in the
      step (rounded up to the GEMM tile); `knee_tokens` is where the two meet, `knee_sharpness` how
      abruptly one takes over from the other;
    - per-token work outside the GEMMs (norms, rotary, activations);
    - prefill attention, proportional to the query-key pairs of a causal chunk;
    - decode attention, proportional to the cached tokens read (memory-bound);
    - interference: each decode in a step that also carries a prefill chunk costs extra in proportion
      to the chunk's length. It is what the calibration data shows beyond the other terms (one
      attention launch shaped by the longest query is a plausible cause), and it is the cost that
      disaggregation removes.
    """

    shape: str
    floor_ms: float
    knee_tokens: float
    knee_sharpness: float
    per_token_ms: float
    prefill_attention_ms_per_pair: float
    decode_attention_ms_per_token: float
    interference_ms_per_decode_token: float

    def step_ms(self, prefill_tokens: int, prefill_context: int, decode_batch: int,
                decode_context_total: int) -> float:
        """Milliseconds for one step; an empty step costs nothing."""
        if min(prefill_tokens, prefill_context, decode_batch, decode_context_total) < 0:
            raise ValueError("step contents must not be negative")
        tokens = prefill_tokens + decode_batch
        if tokens == 0:
            return 0.0
        terms = _terms(np.array([prefill_tokens], float), np.array([prefill_context], float),
                       np.array([decode_batch], float), np.array([decode_context_total], float),
                       self.knee_tokens, self.knee_sharpness)
        return float(terms[0] @ self._linear_coefficients())

    def prefill_ms(self, tokens: int, context: int = 0) -> float:
        """A step that carries only a prefill chunk."""
        return self.step_ms(tokens, context, 0, 0)

    def decode_ms(self, batch: int, context_total: int) -> float:
        """A step that carries only decodes."""
        return self.step_ms(0, 0, batch, context_total)

    def _linear_coefficients(self) -> np.ndarray:
        return np.array([self.floor_ms, self.per_token_ms, self.prefill_attention_ms_per_pair,
                         self.decode_attention_ms_per_token, self.interference_ms_per_decode_token])


def _terms(prefill_tokens: np.ndarray, prefill_context: np.ndarray, decode_batch: np.ndarray,
           decode_context_total: np.ndarray, knee_tokens: float, knee_sharpness: float) -> np.ndarray:
    """One row per step, one column per linear coefficient of `StepCostModel` (same order)."""
    tokens = prefill_tokens + decode_batch
    tiled = np.ceil(tokens / GEMM_TILE_TOKENS) * GEMM_TILE_TOKENS
    gemm = (1.0 + (tiled / knee_tokens) ** knee_sharpness) ** (1.0 / knee_sharpness)
    causal_pairs = prefill_tokens * (prefill_context + prefill_tokens / 2.0)
    return np.stack([gemm, tokens, causal_pairs, decode_context_total, decode_batch * prefill_tokens], axis=1)


@dataclass(frozen=True)
class MeasuredStep:
    """One calibration point: what the step carried and its median time."""

    label: str
    prefill_tokens: int
    decode_batch: int
    decode_context_each: int
    ms: float


def measured_steps(shape: str, path: Path = GRID_FILE) -> list[MeasuredStep]:
    """Every prefill, decode and mixed point of one shape in a calibration file."""
    data = json.loads(path.read_text())[shape]
    steps = [MeasuredStep(f"prefill P{p}", int(p), 0, 0, ms) for p, ms in data["prefill"].items()]
    for key, ms in data["decode"].items():
        batch, context = (int(x) for x in re.fullmatch(r"B(\d+)_C(\d+)", key).groups())
        steps.append(MeasuredStep(f"decode {key}", 0, batch, context, ms))
    for key, ms in data["mixed"].items():
        tokens, batch, context = (int(x) for x in re.fullmatch(r"P(\d+)_B(\d+)_C(\d+)", key).groups())
        steps.append(MeasuredStep(f"mixed {key}", tokens, batch, context, ms))
    return steps


# The knee is searched on a grid; for each candidate the other coefficients come from least squares.
_KNEE_SHARPNESS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 20.0)
_KNEE_TOKENS = tuple(float(x) for x in np.geomspace(128, 800, 25))
# Relative errors are flattened with reweighted least squares toward an L8 fit: the simulator
# relies on every measured shape being close, not just on a small average error.
_ERROR_NORM = 8
_REWEIGHTING_ROUNDS = 40


def fit_step_cost_model(shape: str, steps: list[MeasuredStep]) -> StepCostModel:
    """Fit the coefficients to measured steps, minimising relative error."""
    measured = np.array([s.ms for s in steps])
    columns = (np.array([s.prefill_tokens for s in steps], float), np.zeros(len(steps)),
               np.array([s.decode_batch for s in steps], float),
               np.array([s.decode_batch * s.decode_context_each for s in steps], float))
    best = None
    for sharpness in _KNEE_SHARPNESS:
        for knee in _KNEE_TOKENS:
            relative_terms = _terms(*columns, knee, sharpness) / measured[:, None]
            coefficients, loss = _fit_relative(relative_terms)
            if best is None or loss < best[0]:
                best = (loss, knee, sharpness, coefficients)
    _, knee, sharpness, coefficients = best
    c = [float(x) for x in coefficients]
    if min(c) < 0:
        raise ValueError(f"{shape}: a fitted coefficient is negative ({c}); step time would not be monotone")
    return StepCostModel(shape, floor_ms=c[0], knee_tokens=knee, knee_sharpness=sharpness, per_token_ms=c[1],
                         prefill_attention_ms_per_pair=c[2], decode_attention_ms_per_token=c[3],
                         interference_ms_per_decode_token=c[4])


def _fit_relative(relative_terms: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients making `relative_terms @ c` close to 1 in the L8 sense (damped reweighting)."""
    ones = np.ones(len(relative_terms))
    weights = ones.copy()
    for _ in range(_REWEIGHTING_ROUNDS):
        root = np.sqrt(weights)
        coefficients, *_ = np.linalg.lstsq(relative_terms * root[:, None], root, rcond=None)
        error = np.abs(relative_terms @ coefficients - ones)
        weights = 0.5 * weights + 0.5 * np.maximum(error, 1e-3) ** (_ERROR_NORM - 2)
    return coefficients, float(np.sum(error ** _ERROR_NORM))


@functools.cache
def load_cost_model(shape: str) -> StepCostModel:
    """The step cost model for "llama3_8b" or "llama3_70b", fitted once per process to the grid file."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    return fit_step_cost_model(shape, measured_steps(shape))


@dataclass(frozen=True)
class TensorParallelStepCost:
    """One step of an engine whose model is split over `ranks` GPUs, priced from the one-GPU fit.

    Each rank does 1/N of the one-GPU step: it reads 1/N of the weights, runs 1/N of every GEMM's
    columns or rows, and attends with 1/N of the query and KV heads (Llama 3 has 8 KV heads, so up to
    TP 8 they split too). So every fitted term, the weight-read floor included, is divided by N; the
    GEMM knee stays where it was because the floor and the compute shrink together. The ranks then
    all-reduce the activations twice per layer (`ALLREDUCES_PER_LAYER`), each of (prefill tokens +
    decodes) x hidden x 2 bytes, at `allreduce_ms`. The ranks run in lockstep, so this is the step's time.

    The division by N and the communication terms are a model from published figures (see
    `ALLREDUCE_BUS_GBPS`, `ALLREDUCE_LATENCY_US`), not a measurement: the calibration ran on one GPU.
    Left out: kernels that run less efficiently on 1/N of the work (small decode GEMMs), replicated
    norms, and any overlap of communication with compute. At N = 1 it is the fitted model exactly.
    """

    base: StepCostModel
    ranks: int
    layers: int
    hidden: int

    def step_ms(self, prefill_tokens: int, prefill_context: int, decode_batch: int,
                decode_context_total: int) -> float:
        """Milliseconds for one step of every rank; an empty step costs nothing."""
        compute = self.base.step_ms(prefill_tokens, prefill_context, decode_batch, decode_context_total)
        if self.ranks == 1:
            return compute
        if compute == 0.0:
            return 0.0
        return compute / self.ranks + self.communication_ms(prefill_tokens + decode_batch)

    def communication_ms(self, tokens: int) -> float:
        """The step's all-reduces: 2 per layer over `tokens` activations."""
        nbytes = tokens * self.hidden * ACTIVATION_BYTES
        return ALLREDUCES_PER_LAYER * self.layers * allreduce_ms(nbytes, self.ranks)

    def prefill_ms(self, tokens: int, context: int = 0) -> float:
        """A step that carries only a prefill chunk."""
        return self.step_ms(tokens, context, 0, 0)

    def decode_ms(self, batch: int, context_total: int) -> float:
        """A step that carries only decodes."""
        return self.step_ms(0, 0, batch, context_total)


@functools.cache
def load_tensor_parallel_cost(shape: str, tensor_parallel_size: int) -> TensorParallelStepCost:
    """The step cost of a TP-`tensor_parallel_size` engine of `shape` (TP 1 gives the fitted model's times)."""
    check_tensor_parallel_size(shape, tensor_parallel_size)
    dims = MODEL_SHAPES[shape]
    return TensorParallelStepCost(load_cost_model(shape), tensor_parallel_size, dims.layers, dims.hidden)


def worker_kv_memory_gb(shape: str, tensor_parallel_size: int, *, gpu_memory_gb: float = GPU_MEMORY_GB,
                        utilisation: float = 0.9, reserve_gb: float = 16.0) -> float:
    """KV cache memory of one TP-N worker (its N GPUs together), for the real model's bf16 weights.

    Each rank may use `utilisation` of its HBM (vLLM's default `gpu_memory_utilization`, 0.9), holds
    1/N of the weights, and keeps `reserve_gb` for activations at the step budget, CUDA graphs, NCCL
    buffers and allocator slack; the rest is KV. The reserve is an assumption, chosen so that an 8B
    worker at TP 1 gets the 40 GB the simulator has always given a GPU (0.9 x 80 - 16.1 - 16 = 39.9).
    Zero or less means the weights do not fit: the real 70B needs TP 4 under these assumptions (at TP 2
    its 70.6 GB per rank leave no room for the reserve).
    """
    check_tensor_parallel_size(shape, tensor_parallel_size)
    per_rank = gpu_memory_gb * utilisation - reserve_gb - MODEL_SHAPES[shape].weight_gb / tensor_parallel_size
    return tensor_parallel_size * per_rank

"""Engines behind one Protocol: `SimulatedEngine` here, the vLLM adapter in `vllm_engine`."""

from dynamo_grpc.engine.base import Engine, EngineOutput, EngineRequest, FinishReason, Sampling
from dynamo_grpc.engine.simulated import SimulatedEngine, SimulatedEngineConfig

__all__ = ["Engine", "EngineOutput", "EngineRequest", "FinishReason", "Sampling", "SimulatedEngine",
           "SimulatedEngineConfig"]

"""Worker discovery: workers register here; routers and the control plane watch the fleet."""

from dynamo_grpc.registry.base import Registry, RegistryUnavailable, worker_key
from dynamo_grpc.registry.etcd import EtcdRegistry
from dynamo_grpc.registry.memory import MemoryRegistry

__all__ = ["EtcdRegistry", "MemoryRegistry", "Registry", "RegistryUnavailable", "worker_key"]

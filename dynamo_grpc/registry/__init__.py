"""Worker discovery: workers register here; routers and the control plane watch the fleet."""

from dynamo_grpc.registry.access import EtcdAccess, EtcdAccessError
from dynamo_grpc.registry.base import Registry, RegistryAccessDenied, RegistryUnavailable, worker_key
from dynamo_grpc.registry.documents import DEMAND_DOCUMENT, PAIRINGS_DOCUMENT, PLAN_DOCUMENT, SCALE_DOCUMENT
from dynamo_grpc.registry.etcd import EtcdRegistry
from dynamo_grpc.registry.memory import MemoryRegistry

__all__ = ["DEMAND_DOCUMENT", "PAIRINGS_DOCUMENT", "PLAN_DOCUMENT", "SCALE_DOCUMENT", "EtcdAccess",
           "EtcdAccessError", "EtcdRegistry", "MemoryRegistry", "Registry", "RegistryAccessDenied",
           "RegistryUnavailable", "worker_key"]

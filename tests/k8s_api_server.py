"""A small Kubernetes API server for tests: the scale subresource of Deployments, authorized by RBAC.

It holds what `kubectl apply` makes of the compiled manifests (Deployments, Roles, RoleBindings) and
answers GET and PATCH of `/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale` over HTTP on loopback
with the kubernetes client's own models, so the real client (kubeconfig loading, serialization, patch
content types) is what talks to it. Each call is authorized as the ServiceAccount whose bearer token it
carries, against the Roles bound to that account: a test sees both that the actuator's calls work and
that the manifests' Role allows them and nothing more. `fail_next` makes the server refuse calls the way
an overloaded API server does.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from aiohttp import web
from kubernetes import client

_SCALE_PATH = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"
_MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
_JSON_PATCH = "application/json-patch+json"


class _Refusal(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class FakeApiServer:
    """Deployments' replicas behind the scale subresource, with RBAC; in-memory, one test long."""

    def __init__(self) -> None:
        self.replicas: dict[tuple[str, str], int] = {}
        """(namespace, Deployment) -> spec.replicas"""
        self.selectors: dict[tuple[str, str], str] = {}
        self.roles: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.bindings: list[tuple[str, str, str, str]] = []
        """(namespace, role, subject namespace, service account)"""
        self.tokens: dict[str, tuple[str, str]] = {}
        self.patches: list[tuple[str, int]] = []
        """Every replicas value set through the API, in order: (Deployment, replicas)."""
        self.refused = 0
        self._fail: list[int] = []
        self._version = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> FakeApiServer:
        app = web.Application()
        app.router.add_route("GET", _SCALE_PATH, self._get_scale)
        app.router.add_route("PATCH", _SCALE_PATH, self._patch_scale)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def apply(self, documents: Iterable[dict[str, Any]]) -> None:
        """What `kubectl apply` creates: a Deployment without `replicas` starts with one."""
        for doc in documents:
            meta = doc["metadata"]
            key = (meta.get("namespace", "default"), meta["name"])
            if doc["kind"] == "Deployment":
                self.replicas.setdefault(key, doc["spec"].get("replicas", 1))
                labels = doc["spec"]["selector"]["matchLabels"]
                self.selectors[key] = ",".join(f"{k}={v}" for k, v in labels.items())
            elif doc["kind"] == "Role":
                self.roles[key] = doc["rules"]
            elif doc["kind"] == "RoleBinding":
                self.bindings += [(key[0], doc["roleRef"]["name"], s.get("namespace", key[0]), s["name"])
                                  for s in doc["subjects"] if s["kind"] == "ServiceAccount"]

    def kubeconfig(self, path: Path, namespace: str, service_account: str) -> Path:
        """A kubeconfig that calls this server as the ServiceAccount (as its mounted token would)."""
        token = secrets.token_hex(16)
        self.tokens[token] = (namespace, service_account)
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": service_account,
                                                      "namespace": namespace}}],
        }))
        return path

    def fail_next(self, count: int, code: int = 503) -> None:
        self._fail += [code] * count

    def _authorize(self, request: web.Request, verb: str) -> None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.tokens:
            raise _Refusal(401, "Unauthorized", "Unauthorized")
        sa_namespace, account = self.tokens[token]
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        for rules in (self.roles.get((namespace, role), []) for ns, role, subject_ns, subject in self.bindings
                      if ns == namespace and (subject_ns, subject) == (sa_namespace, account)):
            for rule in rules:
                if ("apps" in rule["apiGroups"] and "deployments/scale" in rule["resources"] and
                        verb in rule["verbs"] and name in rule.get("resourceNames", [name])):
                    return
        raise _Refusal(403, "Forbidden", f'deployments.apps "{name}" is forbidden: User '
                       f'"system:serviceaccount:{sa_namespace}:{account}" cannot {verb} resource '
                       f'"deployments/scale" in API group "apps" in the namespace "{namespace}"')

    def _deployment(self, request: web.Request) -> tuple[str, str]:
        key = (request.match_info["namespace"], request.match_info["name"])
        if key not in self.replicas:
            raise _Refusal(404, "NotFound", f'deployments.apps "{key[1]}" not found')
        return key

    def _scale(self, key: tuple[str, str]) -> web.Response:
        scale = client.V1Scale(
            api_version="autoscaling/v1", kind="Scale",
            metadata=client.V1ObjectMeta(name=key[1], namespace=key[0], resource_version=str(self._version)),
            spec=client.V1ScaleSpec(replicas=self.replicas[key]),
            status=client.V1ScaleStatus(replicas=self.replicas[key], selector=self.selectors[key]))
        return web.json_response(client.ApiClient().sanitize_for_serialization(scale))

    async def _get_scale(self, request: web.Request) -> web.Response:
        return await self._answer(request, "get")

    async def _patch_scale(self, request: web.Request) -> web.Response:
        return await self._answer(request, "patch")

    async def _answer(self, request: web.Request, verb: str) -> web.Response:
        try:
            if self._fail:
                self.refused += 1
                code = self._fail.pop(0)
                raise _Refusal(code, "ServiceUnavailable",
                               "the server is currently unable to handle the request")
            self._authorize(request, verb)
            key = self._deployment(request)
            if verb == "patch":
                replicas = _patched_replicas(request.content_type, await request.json())
                self.replicas[key] = replicas
                self._version += 1
                self.patches.append((key[1], replicas))
            return self._scale(key)
        except _Refusal as refusal:
            status = client.V1Status(api_version="v1", kind="Status", status="Failure",
                                     message=refusal.message, reason=refusal.reason, code=refusal.code)
            return web.json_response(client.ApiClient().sanitize_for_serialization(status),
                                     status=refusal.code)


def _patched_replicas(content_type: str, body: Any) -> int:
    """spec.replicas from a patch of a Scale, refused the way the API server refuses a bad one."""
    if content_type in _MERGE_PATCHES:
        if not isinstance(body, dict):
            raise _Refusal(400, "BadRequest", "a merge patch must be a JSON object")
        replicas = body.get("spec", {}).get("replicas")
    elif content_type == _JSON_PATCH:
        if not isinstance(body, list):
            raise _Refusal(400, "BadRequest", "json: cannot unmarshal object into Go value of type "
                           "[]handlers.jsonPatchOp")
        replicas = next((op.get("value") for op in body if op.get("path") == "/spec/replicas"), None)
    else:
        raise _Refusal(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                       f"accepted media types include: {', '.join((_JSON_PATCH, *_MERGE_PATCHES))}")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise _Refusal(422, "Invalid", f"Scale.autoscaling \"\" is invalid: spec.replicas: Invalid value: "
                       f"{replicas!r}: must be greater than or equal to 0")
    return replicas

"""`dynamo-grpc etcd-setup-auth`: the etcd roles and users that let only workers register (docs/security.md).

Roles (grants add up, so one etcd can serve several namespaces):
- `dynamo-worker`: read the namespace, read and write its workers (`/dynamo-grpc/<ns>/workers/`).
- `dynamo-reader` (routers, frontends): read the namespace, write only the `demand` document.
- `dynamo-control-plane` (control plane, `up`, k8s-actuator): read and write the namespace.
A user of each role's name holds it; `root` (etcd's administrator) is created when authentication is off.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Sequence
from pathlib import Path

import grpc
import grpc.aio
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end
from etcd3aio.auth import AuthService, PermissionType

from dynamo_grpc.registry.access import EtcdAccess
from dynamo_grpc.registry.base import (
    RegistryAccessDenied,
    RegistryUnavailable,
    document_key,
    namespace_prefix,
    workers_prefix,
)
from dynamo_grpc.registry.documents import DEMAND_DOCUMENT

WORKER_ROLE = "dynamo-worker"
READER_ROLE = "dynamo-reader"
CONTROL_PLANE_ROLE = "dynamo-control-plane"
ROOT = "root"
TIMEOUT_S = 5.0


def role_permissions(namespace: str) -> dict[str, list[tuple[PermissionType, str, bool]]]:
    """Each role's grants: (permission, key, whether the key is a prefix)."""
    everything, workers = namespace_prefix(namespace), workers_prefix(namespace)
    read_all = (PermissionType.READ, everything, True)
    return {
        WORKER_ROLE: [read_all, (PermissionType.READWRITE, workers, True)],
        READER_ROLE: [read_all, (PermissionType.READWRITE, document_key(namespace, DEMAND_DOCUMENT), False)],
        CONTROL_PLANE_ROLE: [(PermissionType.READWRITE, everything, True)],
    }


async def setup_auth(endpoints: Sequence[str], admin: EtcdAccess, *, namespace: str,
                     password_dir: Path) -> dict[str, Path]:
    """Create the roles and users, then turn authentication on; each user -> its password file. With
    authentication already on, `admin` must be `root`'s credentials."""
    password_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    async with Etcd3Client(list(endpoints), **admin.channel_credentials()) as client:
        assert client.auth is not None
        auth = client.auth
        try:
            enabled = await _log_in(client, admin)
            if enabled and not (admin.user or admin.cert):
                raise RegistryAccessDenied(
                    f"authentication is already on at {', '.join(endpoints)}: pass --etcd-user root and "
                    "--etcd-password-file with root's password (or root's client certificate) to change "
                    "roles and users")
            written = {}
            users = [] if enabled else [ROOT]
            for role, grants in role_permissions(namespace).items():
                await _ensure_role(auth, role, grants)
                users.append(role)
            for user in users:
                written[user] = await _ensure_user(auth, user, password_dir / f"{user}.password")
                await auth.user_grant_role(user, user, timeout=TIMEOUT_S)
            if not enabled:
                await auth.auth_enable(timeout=TIMEOUT_S)
            return written
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as error:
            detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
            raise RegistryUnavailable(f"setting up authentication at {', '.join(endpoints)} failed: "
                                      f"{detail}") from error


async def _log_in(client: Etcd3Client, admin: EtcdAccess) -> bool:
    """Whether etcd has authentication on (etcd 3.4 has no AuthStatus); if so, authenticate as `admin`."""
    assert client.auth is not None
    try:
        response = await client.auth.authenticate(admin.user, admin.password, timeout=TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        if "authentication is not enabled" in (error.details() or ""):
            return False
        if not admin.user and "authentication failed" in (error.details() or ""):
            return True  # on, and only a client certificate (or nothing) says who we are
        raise
    client.set_token(response.token)
    return True


async def _ensure_role(auth: AuthService, role: str, grants: list[tuple[PermissionType, str, bool]]) -> None:
    await _ignoring_exists(auth.role_add(role, timeout=TIMEOUT_S))
    for permission, key, prefix in grants:
        await auth.role_grant_permission(role, key, prefix_range_end(key) if prefix else None,
                                         perm_type=permission, timeout=TIMEOUT_S)


async def _ensure_user(auth: AuthService, user: str, password_file: Path) -> Path:
    """The user with the password in `password_file`, which is written first if it does not exist."""
    if not password_file.exists():
        password_file.touch(mode=0o600)
        password_file.write_text(secrets.token_urlsafe(24) + "\n")
    password = password_file.read_text().splitlines()[0]
    if user == ROOT:
        await _ignoring_exists(auth.role_add(ROOT, timeout=TIMEOUT_S))  # etcd enables auth only for a root
    try:
        await auth.user_add(user, password, timeout=TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        if "already exists" not in (error.details() or ""):
            raise
        await auth.user_change_password(user, password, timeout=TIMEOUT_S)
    return password_file


async def _ignoring_exists(call: Awaitable[object]) -> None:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        if "already exists" not in (error.details() or ""):
            raise

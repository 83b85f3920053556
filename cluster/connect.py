"""Bringing Ray up: an embedded local cluster by default, or joining an existing one.

- ``connect(None)`` starts an embedded single-node Ray in this process (``ray.init``).
- ``connect("HOST:PORT")`` joins a cluster started with ``ray start --head --port=PORT``
  (or ``ray up cluster/ray-cluster.yaml``, or the KubeRay manifest ``cluster/kuberay.yaml``).
  The address is checked first, in seconds, instead of Ray's long retry loop (20 s of warnings
  and a traceback): TCP reachability, then one gRPC call to the cluster's GCS, which tells a
  Ray cluster from any other listener and whether it wants a token (below).
- ``worker_placement(n)`` reserves one bundle per worker in a placement group (SPREAD across
  nodes when there are several) so that shards land on different nodes.

Token authentication (Ray 2.60). A cluster runs with ``RAY_AUTH_MODE=token`` when its head was
started so (``ray start --head`` turns it on by itself when it finds a token, and an embedded
``ray.init()`` always turns it on and writes ``~/.ray/auth_token`` if there is none: so on a
machine that once ran an embedded Ray, ``ray start --head`` has token auth). Every process of
the cluster, drivers included, must then send that token on every gRPC call. A driver reads the
token from, in this order, the ``RAY_AUTH_TOKEN`` variable, the file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``; but it only *sends* it when its own auth mode
is "token", and Ray's ``ray.init`` turns that mode on by itself only for ``address="auto"``/None,
never for an explicit HOST:PORT: such a driver goes in token-less and the GCS refuses it
(``InvalidAuthToken``). So ``connect`` asks the GCS first and sets this process's
``RAY_AUTH_MODE`` to what the cluster runs with; when the cluster wants a token and none is
found, or the one found is refused, it says so in one line. The user gives the token of the
cluster (``ray get-auth-token`` on the head node prints it) as ``RAY_AUTH_TOKEN``, or in a file
named by ``RAY_AUTH_TOKEN_PATH``, or in ``~/.ray/auth_token`` (mode 0600).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot host the workers."""


@dataclass(frozen=True)
class ClusterInfo:
    address: str | None  # None: embedded
    nodes: int
    cpus: float


TOKEN_HELP = ("give this process the cluster's token (`ray get-auth-token` on the head node prints it) "
              "as RAY_AUTH_TOKEN, or in a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token")
GCS_TIMEOUT = 5.0  # seconds for the one gRPC call to the GCS


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if host.startswith("ray://"):
        host = host[len("ray://"):]
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"cluster address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float = 3.0) -> None:
    """TCP reachability of HOST:PORT (seconds, one line when nothing listens)."""
    host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address}: start one with `ray start --head --port={port}` "
            "or leave out --address to run an embedded local cluster") from None


def token_source() -> str:
    """Where a Ray driver in this process would read its token from (Ray's own order)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return "~/.ray/auth_token"


def _local_token(address: str) -> str | None:
    """The token Ray would send from this process (read by Ray's own loader), or None."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        return loader.get_raw_token(ignore_auth_mode=True)
    except Exception as e:  # noqa: BLE001 - Ray raises AuthenticationError for an unreadable RAY_AUTH_TOKEN_PATH
        if os.environ.get("RAY_AUTH_TOKEN_PATH") and not os.environ.get("RAY_AUTH_TOKEN", "").strip():
            raise ClusterError(f"the Ray cluster at {address} uses token authentication and the token file "
                               f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']} cannot be read "
                               "(missing or empty): " + TOKEN_HELP) from None
        raise ClusterError(f"the Ray cluster at {address} uses token authentication and its token cannot be read "
                           f"({str(e).split('.')[0]}): " + TOKEN_HELP) from None


def _gcs_call(address: str, token: str | None):
    """One GetClusterId call to the GCS at ``address``: None when it answers, else the gRPC status
    code. ``token``: sent as Ray sends it (``authorization: Bearer ...``)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    host, port = _split(address)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=GCS_TIMEOUT, metadata=metadata)
        return None
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


def check_cluster(address: str) -> str:
    """Check that a Ray GCS answers at ``address`` and that this process can join it; returns the
    cluster's auth mode, "token" or "disabled". Raises ClusterError with one line otherwise."""
    import grpc

    _probe(address)
    code = _gcs_call(address, None)
    if code is None:
        return "disabled"
    if code != grpc.StatusCode.UNAUTHENTICATED:
        raise ClusterError(
            f"no Ray cluster answers at {address} (something listens there but it is not a Ray head's GCS port: "
            f"{code.name}); give the --port of `ray start --head`")
    token = _local_token(address)
    if token is None:
        raise ClusterError(f"the Ray cluster at {address} uses token authentication and no token was found: "
                           + TOKEN_HELP)
    code = _gcs_call(address, token)
    if code is None:
        return "token"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise ClusterError(f"the Ray cluster at {address} refused the token from {token_source()} "
                           f"(not that cluster's token): " + TOKEN_HELP)
    raise ClusterError(f"the Ray cluster at {address} did not answer with the token ({code.name})")


def _set_auth_mode(mode: str) -> None:
    """This process's Ray auth mode (Ray reads RAY_AUTH_MODE into its cached config)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    if os.environ.get("RAY_AUTH_MODE") != mode:
        os.environ["RAY_AUTH_MODE"] = mode
        Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect(address: str | None = None, num_cpus: int | None = None) -> ClusterInfo:
    import ray

    if ray.is_initialized():
        return _info(address)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    common = dict(namespace="cryptogen", log_to_driver=False, configure_logging=False)
    if address and address not in ("local", "auto") and not address.startswith("ray://"):
        _set_auth_mode(check_cluster(address))
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ray.exceptions.RayError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ClusterError(f"cannot join the Ray cluster at {address}: {first}") from None
    elif address:  # "auto" (the local `ray start` cluster) or a Ray Client ray:// address: Ray's own handling
        if address.startswith("ray://"):
            _probe(address)
        ray.init(address=address, **common)
    else:  # "local": a new embedded instance, never one left by `ray start` on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **common)
    return _info(address)


def _info(address) -> ClusterInfo:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(address, len(nodes), float(ray.cluster_resources().get("CPU", 0)))


def worker_placement(n_workers: int, cpus_per_worker: float = 1.0, timeout_s: float = 60.0):
    """A ready placement group with one bundle per worker (SPREAD over nodes)."""
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group([{"CPU": cpus_per_worker}] * n_workers, strategy="SPREAD")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        have = ray.cluster_resources().get("CPU", 0)
        raise ClusterError(
            f"the cluster cannot place {n_workers} workers x {cpus_per_worker} CPU (it has {have:g} CPUs); "
            "use fewer --workers or add nodes") from None
    return pg


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()

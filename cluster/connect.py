"""Bringing Ray up: an embedded local cluster by default, or joining an existing one.

- ``connect(None)`` starts an embedded single-node Ray in this process (``ray.init``).
- ``connect("HOST:PORT")`` joins a cluster started with ``ray start --head --port=PORT``
  (or ``ray up cluster/ray-cluster.yaml``, or the KubeRay manifest ``cluster/kuberay.yaml``).
  The address is probed first, so an unreachable one fails in seconds with a clear message
  instead of Ray's long retry loop.
- ``worker_placement(n)`` reserves one bundle per worker in a placement group (SPREAD across
  nodes when there are several) so that shards land on different nodes.
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


def _probe(address: str, timeout: float = 3.0) -> None:
    host, _, port = address.rpartition(":")
    if host.startswith("ray://"):
        host = host[len("ray://"):]
    if not host or not port.isdigit():
        raise ClusterError(f"cluster address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address}: start one with `ray start --head --port={port}` "
            "or leave out --address to run an embedded local cluster") from None


def connect(address: str | None = None, num_cpus: int | None = None) -> ClusterInfo:
    import ray

    if ray.is_initialized():
        return _info(address)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    common = dict(namespace="cryptogen", log_to_driver=False, configure_logging=False)
    if address and address != "local":
        _probe(address)
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **common)
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

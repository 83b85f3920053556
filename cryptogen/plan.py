"""Shard plan: a pure function from (model shape, workers) to who holds what.

Like gpt-fast's ``tp.py``: the plan is data, computed up front and validated; model and
protocol code never import the scheduler. Workers are split into ``layer_groups`` groups,
each serving a contiguous range of layers (pipeline style); inside a group, a layer's
attention heads are dealt round-robin and its feed-forward columns (``c_fc`` outputs =
``c_proj`` inputs) are cut into contiguous, near-equal slices.
"""
from __future__ import annotations

from dataclasses import dataclass


class PlanError(ValueError):
    """The requested sharding is impossible or a plan is inconsistent."""


@dataclass(frozen=True)
class LayerShard:
    layer: int
    heads: tuple[int, ...]
    ff_cols: tuple[int, int]  # [start, stop) of the d_ff columns

    @property
    def ff_width(self) -> int:
        return self.ff_cols[1] - self.ff_cols[0]


@dataclass(frozen=True)
class WorkerPlan:
    worker: int
    shards: tuple[LayerShard, ...]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.shards)

    def shard(self, layer: int) -> LayerShard | None:
        return next((s for s in self.shards if s.layer == layer), None)


@dataclass(frozen=True)
class ShardPlan:
    n_layer: int
    n_head: int
    d_ff: int
    workers: tuple[WorkerPlan, ...]

    def owners(self, layer: int) -> list[tuple[int, LayerShard]]:
        """(worker index, its shard) for every worker that serves ``layer``."""
        return [(w.worker, s) for w in self.workers for s in w.shards if s.layer == layer]

    def lead(self, layer: int) -> int:
        """The worker that holds the server's share of the residual stream for ``layer``."""
        return self.owners(layer)[0][0]

    def validate(self) -> "ShardPlan":
        for layer in range(self.n_layer):
            owners = self.owners(layer)
            if not owners:
                raise PlanError(f"layer {layer} is served by no worker")
            heads = sorted(h for _, s in owners for h in s.heads)
            if heads != list(range(self.n_head)):
                raise PlanError(f"layer {layer}: heads {heads} are not each assigned exactly once")
            cols = sorted(s.ff_cols for _, s in owners)
            edges = [0] + [c for pair in cols for c in pair] + [self.d_ff]
            if any(a != b for a, b in zip(edges[::2], edges[1::2])) or any(s.ff_width <= 0 for _, s in owners):
                raise PlanError(f"layer {layer}: feed-forward slices {cols} do not tile [0, {self.d_ff})")
        return self


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def make_plan(n_layer: int, n_head: int, d_ff: int, n_workers: int, layer_groups: int = 1) -> ShardPlan:
    """Deal layers to worker groups, heads and feed-forward columns to the workers of a group."""
    if n_workers < 1:
        raise PlanError(f"need at least one worker, got {n_workers}")
    if not 1 <= layer_groups <= min(n_layer, n_workers):
        raise PlanError(f"layer_groups={layer_groups} must be between 1 and min(layers={n_layer}, workers={n_workers})")
    groups = split_evenly(n_workers, layer_groups)
    layer_ranges = split_evenly(n_layer, layer_groups)
    shards: dict[int, list[LayerShard]] = {w: [] for w in range(n_workers)}
    for (w0, w1), (l0, l1) in zip(groups, layer_ranges):
        size = w1 - w0
        if size > n_head:
            raise PlanError(f"{size} workers share a layer but it has only {n_head} heads; "
                            "use fewer workers or more layer groups")
        cols = split_evenly(d_ff, size)
        for layer in range(l0, l1):
            for i, w in enumerate(range(w0, w1)):
                heads = tuple(range(i, n_head, size))
                shards[w].append(LayerShard(layer, heads, cols[i]))
    plan = ShardPlan(n_layer, n_head, d_ff, tuple(WorkerPlan(w, tuple(s)) for w, s in shards.items()))
    return plan.validate()

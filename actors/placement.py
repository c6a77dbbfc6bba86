"""Where the run's actors go: two Ray placement groups, the learner ranks' and the rollout workers'.

The learner ranks' bundles (1 CPU and --learner-gpus each) are placed first and all on one node
(STRICT_PACK), so their collectives stay inside a node and, on a node with GPUs, they hold GPUs
0..N-1; the workers' bundles then pack the rest of a single node or spread over a cluster's nodes.
The driver asks `Placement` for each actor's scheduling strategy and for the nodes they landed on.
"""
from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@dataclass
class Placement:
    """Two placement groups: the learner ranks' bundles, on one node, and one bundle per rollout worker."""
    learners: object
    workers: object

    def learner(self, i: int):
        return PlacementGroupSchedulingStrategy(self.learners, placement_group_bundle_index=i)

    def worker(self, i: int):
        return PlacementGroupSchedulingStrategy(self.workers, placement_group_bundle_index=i)

    def nodes(self) -> tuple[list[str], list[str]]:
        """-> (node of each learner rank, node of each worker)."""
        table = ray.util.placement_group_table
        return ([table(self.learners)["bundles_to_node_id"][i] for i in range(len(self.learners.bundle_specs))],
                [table(self.workers)["bundles_to_node_id"][i] for i in range(len(self.workers.bundle_specs))])


def place(cfg) -> Placement:
    """The learner ranks first, all on one node (STRICT_PACK: their collectives stay inside it; on a
    node with GPUs they take GPUs 0..N-1, being placed first), then the rollout workers: packed on
    the rest of a single node, spread over the nodes of a cluster."""
    def bundle(gpus):
        return {"CPU": 1, **({"GPU": gpus} if gpus else {})}
    spread = len([n for n in ray.nodes() if n["Alive"]]) > 1
    cpus, need = ray.cluster_resources().get("CPU", 0), cfg.num_learners + cfg.num_rollout_workers
    if need > cpus:  # one CPU per learner rank and per worker: say so now instead of after --sync-timeout
        raise ValueError(f"--num-rollout-workers: {cfg.num_learners} learner rank(s) + {cfg.num_rollout_workers} "
                         f"workers need {need} CPUs (one each); the cluster has {cpus:g}")
    learners = wait_placed([bundle(cfg.learner_gpus)] * cfg.num_learners, "STRICT_PACK", cfg)
    workers = wait_placed([bundle(cfg.gpus_per_worker)] * cfg.num_rollout_workers, "SPREAD" if spread else "PACK", cfg)
    return Placement(learners, workers)


def wait_placed(bundles: list[dict], strategy: str, cfg):
    pg = placement_group(bundles, strategy=strategy)
    if not pg.wait(timeout_seconds=cfg.sync_timeout):
        what = (f"{cfg.num_learners} learner rank(s) on one node" if strategy == "STRICT_PACK" else
                f"{cfg.num_rollout_workers} rollout workers")
        raise TimeoutError(f"placement of {what}, {bundles} ({strategy}), did not succeed within "
                           f"{cfg.sync_timeout:.0f}s; the cluster has {ray.cluster_resources()}")
    return pg

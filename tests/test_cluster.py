"""Multi-node: a head and two worker raylets on this machine, the worker nodes with fake GPUs
(node a: 2, node b: 1).

Ray accepts made-up `num_gpus`, so the placement logic (who lands where, what each actor was
granted) is tested without a GPU; torch still runs on the CPU.
"""
import csv
import json
import os

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

import launch
from nanogrpo.runconfig import RunConfig


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=3, num_gpus=2, resources={"node_a": 1})
    c.add_node(num_cpus=2, num_gpus=1, resources={"node_b": 1})
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def tiny_cfg(tmp_path, **kw) -> RunConfig:
    base = dict(steps=4, prompts_per_step=8, group_size=4, sft_steps=0, eval_every=0, save_every=0,
                num_rollout_workers=2, gpus_per_worker=0.5, num_test=16, quiet=True, out=str(tmp_path / "run"),
                sync_timeout=120.0, dtype="fp32")
    base.update(kw)
    return RunConfig(**base)


def test_placement_and_bitwise_weight_sync(cluster, tmp_path):
    """Guards against actors landing somewhere else than the placement group says, a learner
    without its GPU, and a weight sync that delivers anything but the learner's exact bytes."""
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        plan = launch.make_plan(tiny_cfg(tmp_path), set())
        cfg = plan.cfg.resolved(8, ray.cluster_resources().get("GPU", 0))
        model_dir = launch.create_run_dir(plan)
        run_dir = plan.run_dir
        actors = launch.start_actors(cfg, run_dir, model_dir, {}, None)
        buffer, learner, info = actors.buffer, actors.learner.actor, actors.info
        workers = [s.handle for s in actors.pool.slots]
        learner_nodes, worker_nodes = actors.placement.nodes()
        assert info[0]["node"] == learner_nodes[0]
        assert [i["node"] for i in info[1:]] == worker_nodes
        assert len(info[0]["gpu_ids"]) == 1  # the learner holds a whole (fake) GPU
        assert all(len(i["gpu_ids"]) == 1 for i in info[1:])  # a worker sees the GPU it shares
        gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}
        assert set(learner_nodes + worker_nodes) <= gpu_nodes
        # Publish, let every worker load it, compare digests; then one update and again.
        for version in range(2):
            weights = ray.get(learner.publish.remote())
            work = [[(version * 10 + i, version, i)] for i in range(len(workers))]
            ray.get([w.rollout.remote(wk, weights, version) for w, wk in zip(workers, work)])
            lv, ld = ray.get(learner.weights_digest.remote())
            assert lv == version
            for w in workers:
                assert ray.get(w.weights_digest.remote()) == (version, ld)
            table = ray.get(buffer.take.remote(len(workers), version, 30.0))
            assert set(table.column("policy_version").to_pylist()) == {version}
            ray.get(learner.train_step.remote(table))
    finally:
        ray.shutdown()


def test_multinode_run_completes_with_staleness_one(cluster, tmp_path):
    """The driver end to end on three raylets with k = 1. Guards against consuming groups older
    than current - 1, episodes from versions the learner never published, and lost episodes."""
    cfg = tiny_cfg(tmp_path, steps=5, max_staleness=1, address=cluster.address)
    run_dir = launch.run(cfg, {"address"})
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["reward_mean"]]
    assert len(rows) == 5
    assert max(float(r["staleness_max"]) for r in rows) <= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["produced"] == summary["consumed"] + summary["dropped"] + summary["in_buffer"]
    log = pq.read_table(run_dir / "episodes")
    assert set(log.column("policy_version").to_pylist()) <= set(range(0, 6))
    assert log.num_rows == summary["produced"] * cfg.group_size
    assert os.path.isdir(summary["checkpoint"])


def test_learner_ranks_packed_on_one_node_first_gpus(cluster, tmp_path):
    """Guards against data-parallel learner ranks spread over nodes (their all-reduce would cross
    the network each step), ranks sharing a GPU or sitting on GPUs the rollout workers use, and a
    2-rank run on a cluster not finishing: the ranks hold GPUs 0 and 1 of node a (the only node with
    two), the workers are elsewhere, and the run completes."""
    cfg = tiny_cfg(tmp_path, steps=3, num_learners=2, address=cluster.address)
    ray.init(address=cluster.address, log_to_driver=False)  # the run uses this connection (and ends it)
    node_a = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("node_a"))
    run_dir = launch.run(cfg, {"address"})
    placed = json.loads((run_dir / "placement.json").read_text())
    learner_nodes = {r["node"] for r in placed["learner"]}
    assert len(learner_nodes) == 1
    assert sorted(g for r in placed["learner"] for g in r["gpu_ids"]) == [0, 1]
    assert learner_nodes == {node_a}
    assert learner_nodes.isdisjoint(w["node"] for w in placed["workers"])
    assert len([r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["reward_mean"]]) == 3

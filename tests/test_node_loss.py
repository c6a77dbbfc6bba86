"""A node holding rollout workers removed mid-run (ray.cluster_utils.Cluster: a head and one worker
raylet on this machine). The head carries a fake GPU so the learner's bundle (1 GPU) sits there,
and CPUs enough to take the lost node's bundles if Ray reschedules them."""
import csv
import json
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

import launch
from nanogrpo.runconfig import RunConfig


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 1})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def rows(run_dir):
    try:
        return [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["reward_mean"]]
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_node_with_rollout_workers_removed_mid_run(cluster, tmp_path):
    """Guards against a lost node ending the run or hanging it: its workers come back on the nodes
    left (placement-group rescheduling) or the run goes on with the workers it still has and says
    so; every step finishes and the episode accounting balances."""
    cfg = RunConfig(steps=16, prompts_per_step=4, group_size=4, sft_steps=0, eval_every=4, save_every=0,
                    num_rollout_workers=2, learner_gpus=1, num_test=16, quiet=True, out=str(tmp_path / "run"),
                    sync_timeout=20.0, dtype="fp32", address=cluster.address, max_new_tokens=8)
    ray.init(address=cluster.address, log_to_driver=False)  # here: ray.init wants the main thread
    result = {}
    t = threading.Thread(target=lambda: result.update(run_dir=launch.run(cfg, {"address"})), daemon=True)
    t.start()
    t0 = time.time()
    while len(rows(tmp_path / "run")) < 3:
        assert time.time() - t0 < 300 and t.is_alive(), "the run did not get to step 3"
        time.sleep(0.2)
    tables = ray.util.placement_group_table().values()
    where = next(t for t in tables if len(t["bundles"]) == 2)["bundles_to_node_id"]  # the workers' group
    worker_node = cluster.list_all_nodes()[1]
    assert worker_node.node_id in (where[0], where[1]), where  # SPREAD put a rollout worker there
    cluster.remove_node(worker_node)
    t.join(timeout=540)
    assert not t.is_alive(), "the run hung after the node was removed"
    summary = json.loads((result["run_dir"] / "summary.json").read_text())
    assert summary["steps"] == 16
    assert [int(r["step"]) for r in rows(result["run_dir"])] == list(range(1, 17))
    assert summary["worker_restarts"] >= 1
    assert summary["produced"] == summary["consumed"] + summary["dropped"] + summary["in_buffer"] + summary["lost"]

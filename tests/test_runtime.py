"""Ray actors in one local cluster: the episode buffer, weight packing and the gloo broadcast."""
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from actors.buffer import EpisodeBuffer
from nanogrpo.episode import SCHEMA, group_batch
from nanogrpo.model import Qwen2
from nanogrpo.optim import CPUOffloadAdamW
from nanogrpo.weights import CollectiveGroup, digest, flatten_parameters, pack, unpack_into

TINY = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_group(gid: int, version: int, G: int = 2):
    rows = [{"group_id": gid, "step": gid, "example_index": gid, "sample_index": i, "prompt_ids": [1, 2],
             "completion_ids": [3, 4, 5], "logprobs": [-0.1, -0.2, -0.3], "response": "x", "reward": float(i),
             "reward_format": 1.0, "reward_answer": 0.0, "finish_reason": "stop", "policy_version": version,
             "worker_id": 0, "gen_seconds": 0.1, "created_at": time.time()} for i in range(G)]
    return group_batch(rows)


def test_buffer_take_respects_min_version_and_counts(local_ray, tmp_path):
    """Guards against the learner training on too-stale groups, and against accounting that stops
    balancing (produced = consumed + dropped + buffered) when stale groups are dropped."""
    buf = EpisodeBuffer.remote(16, str(tmp_path / "episodes"), None, 1)
    ray.get(buf.put.remote([make_group(0, 0), make_group(1, 1), make_group(2, 2), make_group(3, 2)]))
    table = ray.get(buf.take.remote(2, 2, 5.0))
    assert table.schema.equals(SCHEMA)
    assert set(table.column("policy_version").to_pylist()) == {2}
    s = ray.get(buf.stats.remote())
    assert (s["produced"], s["consumed"], s["dropped"], s["in_buffer"]) == (4, 2, 2, 0)
    assert s["produced"] == s["consumed"] + s["dropped"] + s["in_buffer"]
    ray.get(buf.flush.remote())
    log = pq.read_table(tmp_path / "episodes")
    assert log.num_rows == 8 and log.schema.equals(SCHEMA)
    assert sorted(set(log.column("group_id").to_pylist())) == [0, 1, 2, 3]


def test_buffer_take_waits_for_data_and_times_out(local_ray):
    """Guards against a take that returns short batches, or hangs forever when workers are dead."""
    buf = EpisodeBuffer.remote(16)
    ref = buf.take.remote(2, 0, 10.0)
    time.sleep(0.3)
    ray.get(buf.put.remote([make_group(0, 0)]))
    assert ray.wait([ref], timeout=0.5)[0] == []  # still waiting for the second group
    ray.get(buf.put.remote([make_group(1, 0)]))
    assert ray.get(ref, timeout=10).num_rows == 4
    with pytest.raises(ray.exceptions.RayTaskError, match="waited 1s for 1 groups"):
        ray.get(buf.take.remote(1, 0, 1.0))


def test_buffer_backpressure(local_ray):
    """Guards against unbounded memory growth: a put into a full buffer waits, then fails clearly."""
    buf = EpisodeBuffer.remote(2)
    ray.get(buf.put.remote([make_group(0, 0), make_group(1, 0)]))
    with pytest.raises(ray.exceptions.RayTaskError, match="buffer stayed full"):
        ray.get(buf.put.remote([make_group(2, 0)], 1.0))
    pending = buf.put.remote([make_group(3, 0)], 10.0)
    ray.get(buf.take.remote(1, 0, 5.0))
    assert ray.get(pending, timeout=10) == 2  # the take made room; the blocked put went through


def test_buffer_rejects_wrong_schema(local_ray):
    """Guards against a worker silently writing rows the learner cannot read."""
    import pyarrow as pa
    buf = EpisodeBuffer.remote(4)
    bad = pa.RecordBatch.from_pylist([{"group_id": 1}])
    with pytest.raises(ray.exceptions.RayTaskError, match="declared schema"):
        ray.get(buf.put.remote([bad]))


def test_pack_unpack_is_bitwise_and_one_buffer_per_dtype():
    """Guards against a weight sync that loses bits (dtype casts, tied weights) or puts one object
    per tensor."""
    src = Qwen2.from_config(TINY, seed=1)
    dst = Qwen2.from_config(TINY, seed=2)
    assert digest(src) != digest(dst)
    packed = pack(src, version=7)
    assert list(packed.buffers) == ["float32"]
    unpack_into(dst, packed)
    assert digest(src) == digest(dst)
    src16, dst16 = Qwen2.from_config(TINY, seed=1).to(torch.bfloat16), Qwen2.from_config(TINY, seed=3).to(torch.bfloat16)
    unpack_into(dst16, pack(src16, 1))
    assert digest(src16) == digest(dst16)


def test_flattened_model_trains_in_place_and_packs_without_a_copy():
    """Guards against the zero-copy publish path shipping stale or aliased weights: after
    flatten_parameters an optimizer step must land in the flat buffer that pack(copy=False)
    returns, pack(copy=True) must not alias it, and a worker sharing the buffers must compute the
    same logits as the learner."""
    model = Qwen2.from_config(TINY, seed=1)
    before = digest(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    ref_logits = model(ids)
    flats = flatten_parameters(model)
    assert digest(model) == before and torch.equal(model(ids), ref_logits)
    flat = flats[torch.float32]
    assert all(flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel() * 4 for p in model.parameters())
    opt = CPUOffloadAdamW(model.parameters(), lr=1e-2)
    model(ids).float().logsumexp(-1).mean().backward()
    opt.step()
    assert digest(model) != before
    live, copied = pack(model, 1, copy=False), pack(model, 1)
    assert live.buffers["float32"].ctypes.data == flat.data_ptr()  # no packing copy
    assert copied.buffers["float32"].ctypes.data != flat.data_ptr()
    np.testing.assert_array_equal(live.buffers["float32"], copied.buffers["float32"])
    worker = Qwen2.from_config(TINY, seed=5).eval()
    unpack_into(worker, copied, share=True)
    base = copied.buffers["float32"].ctypes.data
    assert all(base <= p.data_ptr() < base + copied.buffers["float32"].nbytes for p in worker.parameters())
    assert digest(worker) == digest(model)
    with torch.no_grad():
        assert torch.equal(worker(ids), model(ids))
    model.to(torch.float64)  # parameters moved out of the flat buffer: pack must notice and copy
    assert pack(model, 2, copy=False).buffers["float64"].ctypes.data != flat.data_ptr()


@ray.remote
class Peer:
    def __init__(self, seed):
        torch.set_num_threads(1)
        self.model = Qwen2.from_config(TINY, seed=seed)

    def ip_port(self):
        from learner.sync import free_port
        return ray.util.get_node_ip_address(), free_port()

    def join(self, addr, port, rank, world, timeout, flat=False):
        if flat:
            flatten_parameters(self.model)
        self.group = CollectiveGroup(addr, port, rank, world, timeout, backend="gloo")

    def broadcast(self, version):
        t0 = time.perf_counter()
        try:
            return self.group.broadcast(self.model, version), time.perf_counter() - t0, None
        except RuntimeError as e:  # gloo reports a timed-out collective as RuntimeError
            return None, time.perf_counter() - t0, str(e)

    def digest(self):
        return digest(self.model)


def test_gloo_broadcast_bitwise_then_timeout(local_ray):
    """Guards against a collective sync that delivers wrong bytes, and against one that hangs
    forever when a peer never answers (it must raise within its timeout)."""
    sender, receiver = Peer.remote(1), Peer.remote(2)
    addr, port = ray.get(sender.ip_port.remote())
    ray.get([sender.join.remote(addr, port, 0, 2, 5.0), receiver.join.remote(addr, port, 1, 2, 5.0, flat=True)])
    (v0, _, e0), (v1, _, e1) = ray.get([sender.broadcast.remote(3), receiver.broadcast.remote(-1)])
    assert e0 is None and e1 is None and v0 == v1 == 3
    assert ray.get(sender.digest.remote()) == ray.get(receiver.digest.remote())
    # Now the receiver never calls broadcast: the sender must fail, not hang.
    v, seconds, err = ray.get(sender.broadcast.remote(4), timeout=60)
    assert v is None and err and seconds < 30


def test_buffer_takes_oldest_version_first_and_reports_dropped(local_ray):
    """Guards against the k >= 1 starvation bug: taking newer groups first left older ones to go
    stale, the last step came up short and the run hung; dropped work must be re-issuable."""
    buf = EpisodeBuffer.remote(16)
    ray.get(buf.put.remote([make_group(10, 2), make_group(11, 1), make_group(12, 2), make_group(13, 0)]))
    t = ray.get(buf.take.remote(2, 1, 5.0))
    assert sorted(set(t.column("group_id").to_pylist())) == [10, 11]  # version 1 first, then the older v2
    assert ray.get(buf.pop_dropped.remote()) == [(13, 13, 13)]  # the v0 group: (group_id, step, example)
    assert ray.get(buf.pop_dropped.remote()) == []


def test_buffer_serves_queued_takes_in_ticket_order(local_ray):
    """Guards against a learner step queued ahead (k >= 1) being served before the step before it
    (taking its groups, or dropping ones still fresh for it), also when Ray starts the later take
    first, and against a cancelled take blocking the ones after it."""
    buf = EpisodeBuffer.remote(16, None, {"next_ticket": 5})

    def until_waiting(n):
        t0 = time.time()
        while ray.get(buf.stats.remote())["waiting_takes"] != n:
            assert time.time() - t0 < 30, "takes never started waiting"
            time.sleep(0.05)

    later = buf.take.remote(1, 1, 10.0, ticket=6)  # step 7 wants 1 group of version >= 1, and arrives first
    until_waiting(1)
    earlier = buf.take.remote(2, 0, 10.0, ticket=5)  # step 6 wants 2 groups of version >= 0
    until_waiting(2)
    ray.get(buf.put.remote([make_group(20, 1)]))
    # Enough for the later take alone, but ticket 5 comes first: the group must stay for it.
    assert ray.wait([later], timeout=0.5)[0] == []
    ray.get(buf.put.remote([make_group(21, 0)]))
    assert sorted(set(ray.get(earlier, timeout=10).column("group_id").to_pylist())) == [20, 21]
    ray.get(buf.put.remote([make_group(22, 1)]))
    assert ray.get(later, timeout=10).column("group_id").to_pylist() == [22, 22]
    assert ray.get(buf.stats.remote())["dropped"] == 0
    stuck = buf.take.remote(1, 0, 10.0, ticket=7)
    until_waiting(1)
    after = buf.take.remote(1, 0, 10.0, ticket=8)
    until_waiting(2)
    ray.cancel(stuck)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
        ray.get(stuck, timeout=10)
    ray.get(buf.put.remote([make_group(23, 2)]))
    assert ray.get(after, timeout=10).column("group_id").to_pylist() == [23, 23]


def test_buffer_splits_a_batch_of_several_groups(local_ray):
    """Guards against a worker's one-batch-per-call put being stored (and counted, and taken) as one
    group: every group in it must be its own unit."""
    import pyarrow as pa
    buf = EpisodeBuffer.remote(16)
    several = pa.Table.from_batches([make_group(30, 1), make_group(31, 0, G=3), make_group(32, 1)])
    assert ray.get(buf.put.remote(several.combine_chunks().to_batches())) == 3
    t = ray.get(buf.take.remote(1, 0, 5.0))  # the oldest version first: group 31, all 3 rows
    assert t.column("group_id").to_pylist() == [31, 31, 31]
    t = ray.get(buf.take.remote(2, 1, 5.0))
    assert t.column("group_id").to_pylist() == [30, 30, 32, 32]
    assert ray.get(buf.stats.remote())["produced"] == 3


def test_buffer_take_returns_one_contiguous_table(local_ray):
    """Groups are stored as zero-copy slices of the batch they came in. A take must hand back one
    contiguous chunk per column holding only the taken rows: a table of per-group slices cost Ray
    10 ms to serialise for 32 groups (it cuts every slice out of its parent), a copy 0.6 ms."""
    import pyarrow as pa
    buf = EpisodeBuffer.remote(64)
    big = pa.Table.from_batches([make_group(100 + g, 0, G=8) for g in range(16)]).combine_chunks().to_batches()
    assert ray.get(buf.put.remote(big)) == 16
    first = 100
    for n in (1, 4):
        t = ray.get(buf.take.remote(n, 0, 5.0))
        assert t.column("group_id").to_pylist() == [g for g in range(first, first + n) for _ in range(8)]
        first += n
        assert all(c.num_chunks == 1 for c in t.columns)
        assert t.get_total_buffer_size() <= 1.1 * t.nbytes  # no parent buffers ride along

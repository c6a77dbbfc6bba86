"""EpisodeBuffer.take's version boundary, in-process: the actor's class under the Ray decorator
(`__ray_actor_class__`) driven by asyncio, so each call's exact result is read without a cluster."""
import asyncio
import time

import pytest

from actors.buffer import EpisodeBuffer
from nanogrpo.episode import group_batch

Buffer = EpisodeBuffer.__ray_actor_class__


def group(gid: int, version: int, G: int = 2):
    return group_batch([{"group_id": gid, "step": gid, "example_index": 100 + gid, "sample_index": i,
                         "prompt_ids": [1, 2], "completion_ids": [3], "logprobs": [-0.1], "response": "x",
                         "reward": float(i), "reward_format": 1.0, "reward_answer": 0.0, "finish_reason": "stop",
                         "policy_version": version, "worker_id": 0, "gen_seconds": 0.0, "created_at": time.time()}
                        for i in range(G)])


def versions_of(table) -> list[int]:
    return table.column("policy_version").to_pylist()[::2]


def test_take_boundary_is_inclusive_and_drops_exactly_the_older_groups():
    """Guards against an off-by-one in take's min-version: a group whose version equals
    min_version is fresh (taken, oldest version first), one version below is stale (dropped,
    counted, and its work item handed back for re-issue); newer groups stay for later steps."""
    async def scenario():
        buf = Buffer(16)
        await buf.put([group(0, 3), group(1, 1), group(2, 2), group(3, 4), group(4, 2), group(5, 3)])
        t = await buf.take(3, min_version=2, timeout=2.0)
        # Fresh: groups 0 (v3), 2 (v2), 3 (v4), 4 (v2), 5 (v3); the three oldest are 2, 4 and then 0
        # (the first-put of the two v3 groups), returned in buffer order.
        assert t.column("group_id").to_pylist()[::2] == [0, 2, 4] and versions_of(t) == [3, 2, 2]
        assert buf.pop_dropped() == [(1, 1, 101)]  # only the version-1 group: (group_id, step, example)
        s = buf.stats()
        assert (s["produced"], s["consumed"], s["dropped"], s["in_buffer"]) == (6, 3, 1, 2)
        # Left: group 3 (v4) and group 5 (v3). min_version 4 takes group 3 and drops group 5.
        t = await buf.take(1, min_version=4, timeout=2.0)
        assert t.column("group_id").to_pylist() == [3, 3] and versions_of(t) == [4]
        assert buf.pop_dropped() == [(5, 5, 105)]
        assert buf.stats()["in_buffer"] == 0
        # Nothing at or above 5: a take for version 5 waits, then times out naming what it waited for.
        with pytest.raises(TimeoutError, match="version >= 5"):
            await buf.take(1, min_version=5, timeout=0.2)
    asyncio.run(scenario())

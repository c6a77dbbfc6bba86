"""The episode schema: one Arrow row per completion, one RecordBatch per group.

Every row carries what the learner needs to train on it and to audit it: the token ids, the
sampler's per-token log-probs (the behaviour policy for the importance ratio), the reward parts,
and the policy version that produced it (to bound staleness and to check weight sync).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

SCHEMA = pa.schema([
    ("group_id", pa.int64()),          # unique per (step, prompt slot); rows of a group share it
    ("step", pa.int64()),              # learner step the group was produced for
    ("example_index", pa.int64()),     # index into the task's train list
    ("sample_index", pa.int32()),      # 0..G-1 within the group
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),  # sampler log-probs of completion_ids
    ("response", pa.string()),         # decoded completion (with the task's response prefix)
    ("reward", pa.float32()),          # total reward
    ("reward_format", pa.float32()),
    ("reward_answer", pa.float32()),   # 1.0 = solved
    ("finish_reason", pa.string()),    # stop | length
    ("policy_version", pa.int64()),    # learner version whose weights sampled this row
    ("worker_id", pa.int32()),
    ("gen_seconds", pa.float32()),     # wall time of the rollout call that made the group
    ("created_at", pa.float64()),      # unix time the group was finished
])


def group_batch(rows: list[dict]) -> pa.RecordBatch:
    """Rows (dicts with SCHEMA's keys) of one or more whole groups, each group's rows together ->
    a RecordBatch, validated against SCHEMA. One batch per rollout call is much cheaper to send than
    one per group (a RecordBatch pickles its schema and every buffer separately)."""
    return pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def group_starts(group_ids) -> list[int]:
    """Row offsets where each group starts, plus the row count at the end (groups are stored
    contiguously: a new group starts where group_id changes)."""
    gid = np.asarray(group_ids)
    if len(gid) == 0:
        return [0]
    return [0, *(np.flatnonzero(gid[1:] != gid[:-1]) + 1).tolist(), len(gid)]


def split_groups(batch: pa.RecordBatch) -> list[pa.RecordBatch]:
    """A batch of whole groups -> one zero-copy slice per group."""
    starts = group_starts(batch.column("group_id").to_numpy())
    return [batch.slice(a, b - a) for a, b in zip(starts[:-1], starts[1:])]


def to_tensors(table: pa.Table, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded training tensors for a table of episodes.

    input_ids (N, L): prompt + completion; loss_mask (N, L-1) marks the positions whose *next*
    token is a completion token; old_logprobs (N, L-1) sit at those positions too.
    """
    prompts = table.column("prompt_ids").to_pylist()
    comps = table.column("completion_ids").to_pylist()
    logps = table.column("logprobs").to_pylist()
    N = len(prompts)
    L = max(len(p) + len(c) for p, c in zip(prompts, comps))
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    mask = torch.zeros(N, L - 1, dtype=torch.bool)
    old = torch.zeros(N, L - 1, dtype=torch.float32)
    for i, (p, c, lp) in enumerate(zip(prompts, comps, logps)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, len(p) - 1: len(p) - 1 + len(c)] = True
        old[i, len(p) - 1: len(p) - 1 + len(c)] = torch.tensor(lp, dtype=torch.float32)
    return {
        "input_ids": ids,
        "loss_mask": mask,
        "old_logprobs": old,
        "rewards": torch.tensor(table.column("reward").to_pylist(), dtype=torch.float32),
        "versions": torch.tensor(table.column("policy_version").to_pylist(), dtype=torch.long),
        "lengths": torch.tensor([len(p) + len(c) for p, c in zip(prompts, comps)], dtype=torch.long),
    }


def group_tensors(table: pa.Table, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Training tensors with one prompt per group, for `Qwen2.completion_hidden`.

    prompt_ids (P, Tp) and completion_ids (N, Tc) right-padded, with prompt_lens (P,) and
    completion_lens (N,); index (N,) maps a row to its group's prompt; old_logprobs (N, Tc) are the
    sampler's, aligned with completion_ids. Groups must be contiguous (as the buffer stores them),
    and every row of a group must carry the group's prompt.
    """
    prompts = table.column("prompt_ids").to_pylist()
    comps = table.column("completion_ids").to_pylist()
    logps = table.column("logprobs").to_pylist()
    gids = table.column("group_id").to_numpy()
    starts = group_starts(gids)
    group_prompts = [prompts[a] for a in starts[:-1]]
    index = np.repeat(np.arange(len(group_prompts)), np.diff(starts)).tolist()
    for i, p in enumerate(index):
        if prompts[i] != group_prompts[p]:
            raise ValueError(f"group {gids[i]}: rows carry different prompts; a group shares one prompt")
    P, N = len(group_prompts), len(comps)
    prompt_ids = torch.full((P, max(map(len, group_prompts))), pad_id, dtype=torch.long)
    for j, p in enumerate(group_prompts):
        prompt_ids[j, : len(p)] = torch.tensor(p, dtype=torch.long)
    Tc = max(max(map(len, comps)), 1)
    completion_ids = torch.full((N, Tc), pad_id, dtype=torch.long)
    old = torch.zeros(N, Tc, dtype=torch.float32)
    for i, (c, lp) in enumerate(zip(comps, logps)):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        old[i, : len(c)] = torch.tensor(lp, dtype=torch.float32)
    return {
        "prompt_ids": prompt_ids,
        "prompt_lens": torch.tensor([len(p) for p in group_prompts], dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_lens": torch.tensor([len(c) for c in comps], dtype=torch.long),
        "old_logprobs": old,
        "index": torch.tensor(index, dtype=torch.long),
        "rewards": torch.tensor(table.column("reward").to_pylist(), dtype=torch.float32),
        "versions": torch.tensor(table.column("policy_version").to_pylist(), dtype=torch.long),
    }

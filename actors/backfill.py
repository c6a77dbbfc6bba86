"""Backfill: --dynamic-sampling's bookkeeping in the driver (DAPO's dynamic sampling, Yu et al. 2025).

The buffer keeps out groups without reward spread and hands back their work items; for each one the
driver issues one extra prompt for the same step, until the step has had `budget` extras
(--max-resample-factor F: at most F x B prompts for a step's B groups). A filtered group past the
budget is a group that will never come: the driver excuses it at the buffer, and a take comes up
short by it instead of waiting forever. Each step's supply is then exactly B minus its excused
groups, whatever order the rollouts land in.

Extra prompts are a pure function of (step, r), the step's r-th extra: data position step x budget + r
of their own shuffled stream (`position_to_example`), group id EXTRA_BASE + that position. So a
resumed run (or a rewound one) issues the same extras for the same step, and their group ids never
meet the main ones (step x B + j) or their re-issues (+ REISSUE_OFFSET, 10**12, in launch.py).
No Ray here: the driver makes the calls.
"""
from __future__ import annotations

from typing import Callable

EXTRA_BASE = 10**15  # first group id of an extra prompt; main ids and their re-issues stay far below


class Backfill:
    def __init__(self, prompts_per_step: int, factor: float, position_to_example: Callable[[int], int]):
        self.B = prompts_per_step
        self.budget = int((factor - 1) * prompts_per_step + 1e-9)  # extras per step: B + budget <= F x B
        self.example = position_to_example
        self.extras: dict[int, int] = {}  # step -> extra prompts issued for it so far

    def extra_item(self, step: int, r: int) -> tuple[int, int, int]:
        """The work item (group_id, step, example_index) of step `step`'s r-th extra prompt."""
        pos = step * self.budget + r
        return EXTRA_BASE + pos, step, self.example(pos)

    def replace(self, filtered: list[tuple[int, int, int]]) -> tuple[list[tuple[int, int, int]], int]:
        """Work items of filtered groups -> (extra work items to issue, groups to excuse). Taken in
        (step, group id) order, so which extras a set of filtered groups gets (and how they are
        batched) does not depend on the order their rollouts landed in."""
        items, excused = [], 0
        for _, step, _ in sorted(filtered, key=lambda w: (w[1], w[0])):
            r = self.extras.get(step, 0)
            if r < self.budget:
                items.append(self.extra_item(step, r))
                self.extras[step] = r + 1
            else:
                excused += 1
        return items, excused

    def issued(self, step: int) -> int:
        """Prompts issued so far for step `step`'s data: its B and its extras (re-issues of stale
        groups not counted). At most F x B."""
        return self.B + self.extras.get(step, 0)

    def rewind(self, step: int):
        """Steps from `step` on are generated anew (a rewind to a checkpoint, a re-created buffer):
        their extras start again at r = 0, so they are the same extras as the first time."""
        self.extras = {s: n for s, n in self.extras.items() if s < step}

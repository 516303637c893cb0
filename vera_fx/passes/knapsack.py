"""The exact multiple-choice knapsack the lower pass's ``auto`` plan solves (vera_fx/passes/lower.py): one
option ``(work, saved)`` per group, the most saved within a work budget, over the Pareto frontier of partial
choices (exact; an even thinning only past ``max_states`` states)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

State = TypeVar("State", bound=tuple)


def pareto(states: list[State], key: Callable[[State], Any]) -> list[State]:
    """The ``(work, saved, ...)`` states that save more than every cheaper one, in ``key`` order (ties by ``key``)."""
    best: list[State] = []
    for st in sorted(states, key=key):
        if not best or st[1] > best[-1][1]:
            best.append(st)
    return best


def _frontier(groups: list[list[tuple[int, int]]], limit: int, max_states: int
              ) -> tuple[list[tuple[int, int, int, int]], list[list[tuple[int, int, int, int]]]]:
    """The Pareto frontier of ``(work, saved)`` over one option per group with the work at most ``limit``, and
    the states of every stage (``(work, saved, parent state, option)``) to read a choice back."""
    rest = [0] * (len(groups) + 1)  # the least work the groups after each one can add (options may save work)
    for k in range(len(groups) - 1, -1, -1):
        rest[k] = rest[k + 1] + min(w for w, _ in groups[k])
    frontier: list[tuple[int, int, int, int]] = [(0, 0, -1, -1)]
    stages = []
    for k, options in enumerate(groups):
        grown = [(w + ow, s + os, si, oi) for si, (w, s, _, _) in enumerate(frontier)
                 for oi, (ow, os) in enumerate(options) if w + ow + rest[k + 1] <= limit]
        frontier = pareto(grown, lambda st: (st[0], -st[1]))
        if len(frontier) > max_states:  # a pathological case: an even thinning of the frontier (the best kept)
            frontier = frontier[::-(-len(frontier) // max_states)] + frontier[-1:]
        stages.append(frontier)
    return frontier, stages


def _read_back(stages: list[list[tuple[int, int, int, int]]], best: int) -> list[int]:
    picks = [0] * len(stages)
    for k in range(len(stages) - 1, -1, -1):
        _, _, parent, option = stages[k][best]
        picks[k], best = option, parent
    return picks


def choose_options(groups: list[list[tuple[int, int]]], budget: int, max_states: int = 4096) -> list[int]:
    """One option index per group (options ``(work, saved)``) that keeps the most saved values with the summed
    work at most ``budget``: a multiple-choice knapsack, solved exactly by Pareto frontiers of (work, saved)
    states. Groups with the same options (a layer's groups repeat per layer) are first combined into one
    frontier per kind, then the kinds; ties go to less work, then to earlier options."""
    if not groups:
        return []
    kinds: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for k, options in enumerate(groups):
        kinds.setdefault(tuple(options), []).append(k)
    least = {key: len(members) * min(w for w, _ in key) for key, members in kinds.items()}
    combined = []  # per kind: its frontier over its copies and the stages to read each copy's option back
    for key, members in kinds.items():
        limit = budget - sum(v for other, v in least.items() if other != key)
        combined.append(_frontier([list(key)] * len(members), limit, max_states))
    if any(not final for final, _ in combined):  # nothing fits the budget: the least work
        return [min(range(len(options)), key=lambda j: (options[j][0], j)) for options in groups]
    top, top_stages = _frontier([[(w, s) for w, s, _, _ in final] for final, _ in combined], budget, max_states)
    best = max(range(len(top)), key=lambda j: (top[j][1], -top[j][0]))
    picks = [0] * len(groups)
    for (key, members), (_, stages), point in zip(kinds.items(), combined, _read_back(top_stages, best)):
        for k, option in zip(members, sorted(_read_back(stages, point), reverse=True)):
            picks[k] = option  # the copies of one kind are interchangeable: the earlier get the later options
    return picks

"""Token-budget micro-batches: cut a batch into passes of at most ``budget`` tokens.

A pass costs what it computes on: Σ lengths when it is packed (padding-free), and
rows × padded length when it is padded. An item is a tuple of lengths, read in one of two layouts:

- side by side (``side_by_side=True``, a rollout row): a left-padded prompt beside a right-padded
  response, ``(prompt, response)``; the padded length of a pass is (longest prompt + longest response);
- rows (``side_by_side=False``, e.g. a preference pair ``(chosen, rejected)``): each length is a
  right-padded row of its own; the padded length is the longest row of the pass.

- packed: longest-processing-time-first into the fewest bins whose loads stay within the budget
  (each sequence goes to the least loaded bin), so the passes are about equally long;
- padded: sequences sorted by length and cut into consecutive runs, so that each pass pads little.

Under data parallelism every rank must run the same number of passes (ZeRO-2/3 reduce or gather at
every pass), so the trainer asks each rank for its count, takes the largest, and cuts again with
``min_parts``; a rank with fewer sequences than passes gets empty parts, which the trainer fills
with a zero-weight pass. verl's dynamic batch size and OpenRLHF's packed samples do the same.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

Segments = Sequence[int]


def pass_tokens(items: Sequence[Segments], packed: bool, side_by_side: bool = True) -> int:
    """Tokens one pass over ``items`` computes on (see the module docstring)."""
    if not items:
        return 0
    if packed:
        return sum(sum(seg) for seg in items)
    if not side_by_side:
        return sum(len(seg) for seg in items) * max(max(seg) for seg in items)
    width = max(len(seg) for seg in items)
    return len(items) * sum(max(seg[j] if j < len(seg) else 0 for seg in items) for j in range(width))


def longest(items: Sequence[Segments], packed: bool = True, side_by_side: bool = True) -> int:
    """The most tokens a single item costs (a pass holds at least one item)."""
    return max((pass_tokens([seg], packed, side_by_side) for seg in items), default=0)


def split_by_tokens(items: Sequence[Segments], budget: int, *, packed: bool, min_parts: int = 1,
                    side_by_side: bool = True) -> list[list[int]]:
    """Indices of ``items`` cut into passes of at most ``budget`` tokens; at least ``min_parts`` parts.

    Every index appears in exactly one part, each part sorted; parts may be empty only when there are
    fewer items than ``min_parts``. A sequence longer than the budget is the caller's error to report
    (it is given a part of its own here).
    """
    n = len(items)
    if budget <= 0:
        raise ValueError(f"a token budget must be positive, got {budget}")
    order = sorted(range(n), key=lambda i: (-sum(items[i]), i))
    parts = (_split_packed(items, order, budget, min_parts) if packed
             else _split_padded(items, order, budget, side_by_side))
    while len(parts) < min_parts:  # more passes than the budget needs: halve the largest parts
        big = max(range(len(parts)), key=lambda p: (len(parts[p]), -p))
        if len(parts[big]) < 2:
            parts.append([])
            continue
        half = len(parts[big]) // 2
        parts[big:big + 1] = [parts[big][:half], parts[big][half:]]
    return [sorted(p) for p in parts]


def _split_packed(items, order, budget, min_parts) -> list[list[int]]:
    total = sum(sum(items[i]) for i in order)
    bins = max(min_parts, -(-total // budget), 1)
    while True:
        heap = [(0, b) for b in range(bins)]
        parts: list[list[int]] = [[] for _ in range(bins)]
        loads = [0] * bins
        for i in order:
            load, b = heapq.heappop(heap)
            parts[b].append(i)
            loads[b] = load + sum(items[i])
            heapq.heappush(heap, (loads[b], b))
        fits = all(load <= budget or len(p) == 1 for load, p in zip(loads, parts))
        if fits or bins >= len(order):
            return [p for p in parts if p] or [[]]
        bins += 1


def _split_padded(items, order, budget, side_by_side) -> list[list[int]]:
    parts: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and pass_tokens([items[j] for j in current + [i]], False, side_by_side) > budget:
            parts.append(current)
            current = []
        current.append(i)
    if current or not parts:
        parts.append(current)
    return parts

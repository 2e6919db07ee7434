"""Categories into groups by vector count: largest first, each into the group holding the fewest vectors."""

import heapq


def bin_pack(vectors: dict[int, int], groups: int) -> dict[int, int]:
    """category id -> group in 0..groups-1, the groups' vector counts as even as greedy packing makes them."""
    if groups < 1:
        raise ValueError("at least one group")
    loads = [(0, g) for g in range(groups)]
    out: dict[int, int] = {}
    for category, n in sorted(vectors.items(), key=lambda kv: (-kv[1], kv[0])):
        load, group = heapq.heappop(loads)
        out[category] = group
        heapq.heappush(loads, (load + n, group))
    return out

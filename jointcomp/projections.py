"""The two projections of the method, as plain tensor math on any device.

* `knapsack_prune`: keep the weights with the largest w^2 / cost until the budget is met
  (0-1 knapsack, greedy by score). Found by a two-pass radix select on the scores' bit
  patterns instead of a full sort.
* `fit_codebooks`: 1-D k-means with 2^b non-zero centres for several b at once, on sorted
  values with prefix sums, so one Lloyd step for every bitwidth is a single searchsorted.
* `choose_bitwidths`: the multiple-choice knapsack over per-layer (cost, distortion)
  options, greedy on each layer's lower convex hull; `solve_mckp_exact` is the exact
  dynamic programme used to measure the greedy's gap.
"""
from __future__ import annotations

import torch

_HI = 1 << 15  # non-negative float32 bit patterns have 15 significant high bits
_LO = 1 << 16


def knapsack_prune(
    weights: list[torch.Tensor],
    unit_cost: list[float],
    budget: float,
    min_keep: list[int] | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Masks of the weights to keep, and the multiplier (score at the cut).

    Greedy by score w^2 / unit_cost[j] in descending order, ties in flat (layer, index)
    order, stopping at the first weight that does not fit. The `min_keep[j]` largest
    weights of layer j are kept first. Returns lambda = 0 when everything fits.
    """
    scores = [w.detach().flatten().float().square() / c for w, c in zip(weights, unit_cost)]
    for j, k in enumerate(min_keep or []):
        if k > 0:
            scores[j][scores[j].topk(k).indices] = float("inf")
    keys = [s.view(torch.int32) for s in scores]  # monotone in the score, since scores >= 0
    cost = torch.tensor(unit_cost, dtype=torch.float64, device=keys[0].device)

    hi_bucket, spare = _cut_bucket([k >> 16 for k in keys], _HI, cost, budget)
    if hi_bucket < 0:
        return [torch.ones_like(w, dtype=torch.bool) for w in weights], 0.0
    in_bucket = [(k >> 16) == hi_bucket for k in keys]
    lo_bucket, spare = _cut_bucket([k[m] & 0xFFFF for k, m in zip(keys, in_bucket)], _LO, cost, spare)
    cut_key = (hi_bucket << 16) | lo_bucket

    masks = []
    for key, c, w in zip(keys, cost.tolist(), weights):
        ties = key == cut_key
        n_ties = int(ties.sum())
        take = min(n_ties, int(spare // c)) if spare > 0 else 0
        spare = spare - take * c if take == n_ties else -1.0  # the greedy stops at the first misfit
        keep = (key > cut_key) | (ties & (ties.cumsum(0) <= take))
        masks.append(keep.view(w.shape))
    lam = torch.tensor([cut_key], dtype=torch.int32).view(torch.float32).item()
    return masks, lam


def _cut_bucket(
    buckets: list[torch.Tensor], n_buckets: int, cost: torch.Tensor, budget: float
) -> tuple[int, float]:
    """Highest bucket that no longer fits whole when filling from the top.

    Returns (-1, spare) when every bucket fits; else the bucket and the budget left for
    it after all higher buckets are kept.
    """
    flat = torch.cat([b.long() + j * n_buckets for j, b in enumerate(buckets)])
    counts = torch.bincount(flat, minlength=len(buckets) * n_buckets).view(len(buckets), n_buckets)
    per_bucket = (counts.double() * cost[:, None]).sum(0)
    from_top = per_bucket.flip(0).cumsum(0).flip(0)  # cost of this bucket and all above
    over = torch.nonzero(from_top > budget)
    if over.numel() == 0:
        return -1, budget - float(from_top[0])
    cut = int(over.max())
    above = float(from_top[cut + 1]) if cut + 1 < n_buckets else 0.0
    return cut, budget - above


def fit_codebooks(
    values: torch.Tensor, bit_choices: list[int], iters: int = 50
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """1-D k-means with 2^b centres for every b in `bit_choices`, in one batched pass.

    Centres start at evenly spaced quantiles (deterministic). Returns the sorted centres
    for each b (float32) and the squared error of each fit (float64).
    """
    xs = values.detach().flatten().float().sort().values
    n = xs.numel()
    if n == 0:
        raise ValueError("cannot fit a codebook to an empty set of weights")
    dev = xs.device
    x64 = xs.double()
    s1 = torch.cat([x64.new_zeros(1), x64.cumsum(0)])
    s2 = torch.cat([x64.new_zeros(1), x64.square().cumsum(0)])

    sizes = torch.tensor([2**b for b in bit_choices], device=dev)
    seg = torch.repeat_interleave(torch.arange(len(bit_choices), device=dev), sizes)
    rank = torch.arange(int(sizes.sum()), device=dev) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    q = ((rank.double() + 0.5) / sizes[seg].double() * n).long().clamp_(0, n - 1)
    centres = x64[q]
    has_next = torch.ones_like(seg, dtype=torch.bool)
    has_next[(sizes.cumsum(0) - 1)] = False

    def cluster_bounds(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mids = (c[:-1] + c[1:])[has_next[:-1]] / 2
        pos = torch.searchsorted(x64, mids)  # elements equal to a mid go to the upper centre
        lo = torch.zeros_like(seg)
        hi = torch.full_like(seg, n)
        hi[has_next] = pos
        lo[torch.roll(has_next, 1)] = pos
        return lo, hi

    for _ in range(iters):
        lo, hi = cluster_bounds(centres)
        count = (hi - lo).double()
        means = torch.where(count > 0, (s1[hi] - s1[lo]) / count.clamp(min=1), centres)
        if torch.equal(means, centres):
            break
        centres = means

    lo, hi = cluster_bounds(centres)
    sse = (s2[hi] - s2[lo]) - 2 * centres * (s1[hi] - s1[lo]) + centres.square() * (hi - lo)
    distortion = torch.zeros(len(bit_choices), dtype=torch.float64, device=dev).index_add_(0, seg, sse)
    codebooks = list(centres.float().split(sizes.tolist()))
    return codebooks, distortion.clamp_(min=0)


def assign(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre of a sorted codebook for every value (ties go up)."""
    mids = (codebook[:-1].double() + codebook[1:].double()) / 2
    return torch.searchsorted(mids, values.double(), right=True)


def lower_hull(cost: list[float], distortion: list[float]) -> list[int]:
    """Indices of the options on the lower convex hull, cheapest first, dominated ones removed."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], distortion[i]))
    hull: list[int] = []
    for i in order:
        if hull and distortion[i] >= distortion[hull[-1]]:
            continue  # costs more and is no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> i
            lhs = (distortion[a] - distortion[b]) * (cost[i] - cost[a])
            rhs = (distortion[a] - distortion[i]) * (cost[b] - cost[a])
            if lhs <= rhs:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def choose_bitwidths(
    cost: torch.Tensor, distortion: torch.Tensor, budget: float
) -> tuple[torch.Tensor, float]:
    """Pick one option per layer minimising total distortion within the budget.

    `cost` and `distortion` are (layers, options); an option with infinite cost is not
    allowed. Greedy on each layer's lower convex hull: start every layer at its cheapest
    option, then take upgrades in order of distortion saved per bit; a layer whose next
    upgrade does not fit is frozen. Returns the chosen option per layer and the
    multiplier (saving per bit of the first upgrade refused; 0 when none is).
    """
    cost_l, dist_l = cost.double().cpu().tolist(), distortion.double().cpu().tolist()
    hulls = []
    for c, d in zip(cost_l, dist_l):
        ok = [i for i, ci in enumerate(c) if ci != float("inf")]
        hull = lower_hull([c[i] for i in ok], [d[i] for i in ok])
        hulls.append([ok[i] for i in hull])
    choice = [h[0] for h in hulls]
    spent = sum(c[h[0]] for c, h in zip(cost_l, hulls))
    if spent > budget:
        raise ValueError(
            f"even the cheapest bitwidths cost {spent:.0f} bits, over the budget of {budget:.0f}"
        )
    upgrades = [
        ((dist_l[j][a] - dist_l[j][b]) / (cost_l[j][b] - cost_l[j][a]), j, step)
        for j, h in enumerate(hulls)
        for step, (a, b) in enumerate(zip(h[:-1], h[1:]))
    ]
    upgrades.sort(key=lambda u: (-u[0], u[1], u[2]))
    frozen: set[int] = set()
    lam = 0.0
    for slope, j, step in upgrades:
        if j in frozen:
            continue
        a, b = hulls[j][step], hulls[j][step + 1]
        extra = cost_l[j][b] - cost_l[j][a]
        if spent + extra <= budget:
            spent += extra
            choice[j] = b
        else:
            frozen.add(j)
            lam = max(lam, slope)
    return torch.tensor(choice), lam


def solve_mckp_exact(cost: torch.Tensor, distortion: torch.Tensor, budget: int) -> torch.Tensor:
    """Exact multiple-choice knapsack by dynamic programming over integer costs.

    For tests and small instances only: time and memory grow with the budget.
    """
    cost_l = cost.double().tolist()
    best = torch.full((budget + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for c_row, d_row in zip(cost_l, distortion.double().tolist()):
        cand = torch.full((len(c_row), budget + 1), float("inf"), dtype=torch.float64)
        for i, (c, d) in enumerate(zip(c_row, d_row)):
            if c <= budget:
                cand[i, int(c):] = best[: budget + 1 - int(c)] + d
        best, pick = cand.min(0)
        picks.append(pick)
    cap = int(best.argmin())
    choice = []
    for c_row, pick in zip(reversed(cost_l), reversed(picks)):
        i = int(pick[cap])
        choice.append(i)
        cap -= int(c_row[i])
    return torch.tensor(choice[::-1])

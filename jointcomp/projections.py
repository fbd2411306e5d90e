"""The two projections of the method, as plain tensor math on any device.

* `knapsack_prune`: keep the weights with the largest w^2 / cost until the budget is met
  (0-1 knapsack, greedy by score). Found by a two-pass radix select on the scores' bit
  patterns instead of a full sort.
* `fit_codebooks`: 1-D k-means with 2^b centres for several b at once, on sorted values
  with prefix sums, so one Lloyd step for every bitwidth is a single searchsorted.
* `choose_bitwidths`: the multiple-choice knapsack over per-layer (cost, distortion)
  options, greedy on each layer's lower convex hull; `solve_mckp_exact` is the exact
  dynamic programme used to measure the greedy's gap.
* `joint_options`: each layer's (kept count, bitwidth) options with their pruning plus
  quantization error, the table of the joint projection (one multiplier for both).
"""
from __future__ import annotations

import math

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


EXACT_BELOW = 128  # sets this small are clustered exactly (Lloyd's local optima hurt most here)


def fit_codebooks(
    values: torch.Tensor, bit_choices: list[int], iters: int = 50, exact_below: int = EXACT_BELOW
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """1-D k-means with 2^b centres for every b in `bit_choices`.

    Fewer than `exact_below` values: the optimal clustering, by dynamic programming.
    Otherwise Lloyd's algorithm, batched over bitwidths and over three deterministic starts
    (evenly spaced quantiles, evenly spaced values, points spread with density p^(1/3));
    a centre left with no values is moved to split the cluster with the largest error.
    The best fit wins. Returns the
    sorted centres for each b (float32) and the squared error of each fit (float64).
    """
    xs = values.detach().flatten().float().sort().values
    n = xs.numel()
    if n == 0:
        raise ValueError("cannot fit a codebook to an empty set of weights")
    x64 = xs.double()
    s1 = torch.cat([x64.new_zeros(1), x64.cumsum(0)])
    s2 = torch.cat([x64.new_zeros(1), x64.square().cumsum(0)])
    if n < exact_below:
        return _exact_codebooks(x64, s1, s2, bit_choices)
    dev = xs.device

    # segment = one (start, bitwidth) fit; centres of all segments live in one flat tensor
    n_bits, n_starts = len(bit_choices), 3
    sizes = torch.tensor([2**b for b in bit_choices] * n_starts, device=dev)
    seg = torch.repeat_interleave(torch.arange(n_starts * n_bits, device=dev), sizes)
    first = sizes.cumsum(0) - sizes
    frac = (torch.arange(int(sizes.sum()), device=dev) - first[seg] + 0.5).double() / sizes[seg]
    start = seg // n_bits
    starts = (
        x64[(frac * n).long().clamp_(0, n - 1)],  # evenly spaced quantiles
        x64[0] + frac * (x64[-1] - x64[0]),  # evenly spaced values
        _companded(x64, frac),  # the MSE-optimal point density
    )
    centres = torch.where(start == 0, starts[0], torch.where(start == 1, starts[1], starts[2]))
    has_next = torch.ones_like(seg, dtype=torch.bool)
    has_next[first + sizes - 1] = False
    has_prev = torch.roll(has_next, 1)

    def cluster_bounds(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mids = (c[:-1] + c[1:])[has_next[:-1]] / 2
        pos = torch.searchsorted(x64, mids)  # elements equal to a mid go to the upper centre
        lo = torch.zeros_like(seg)
        hi = torch.full_like(seg, n)
        hi[has_next] = pos
        lo[has_prev] = pos
        return lo, hi

    def cluster_sse(c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return (s2[hi] - s2[lo]) - 2 * c * (s1[hi] - s1[lo]) + c.square() * (hi - lo)

    def reseed_empty(c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """The r-th empty centre of a segment takes the upper half of its r-th worst cluster."""
        empty = hi == lo
        worst = torch.sort(-cluster_sse(c, lo, hi), stable=True).indices
        worst = worst[torch.sort(seg[worst], stable=True).indices]  # by segment, worst first
        empties = torch.nonzero(empty).flatten()
        rank = torch.cumsum(empty.long(), 0)[empties] - 1 - torch.cumsum(empty.long(), 0)[first[seg[empties]]] + empty[first[seg[empties]]].long()
        donor = worst[first[seg[empties]] + rank]
        ok = (hi[donor] - lo[donor] >= 2) & ~empty[donor]
        empties, donor = empties[ok], donor[ok]
        mid = (lo[donor] + hi[donor]) // 2
        c = c.clone()
        c[empties] = (s1[hi[donor]] - s1[mid]) / (hi[donor] - mid)
        c[donor] = (s1[mid] - s1[lo[donor]]) / (mid - lo[donor])
        order = torch.sort(c, stable=True).indices
        return c[order[torch.sort(seg[order], stable=True).indices]]  # sorted within segments

    for _ in range(iters):
        lo, hi = cluster_bounds(centres)
        count = (hi - lo).double()
        means = torch.where(count > 0, (s1[hi] - s1[lo]) / count.clamp(min=1), centres)
        if bool((count == 0).any()):
            means = reseed_empty(means, lo, hi)
        if torch.equal(means, centres):
            break
        centres = means

    lo, hi = cluster_bounds(centres)
    sse = cluster_sse(centres, lo, hi)
    per_fit = torch.zeros(n_starts * n_bits, dtype=torch.float64, device=dev).index_add_(0, seg, sse)
    error, best_start = per_fit.clamp_(min=0).view(n_starts, n_bits).min(0)
    fits = centres.float().split(sizes.tolist())
    codebooks = [fits[s * n_bits + i] for i, s in enumerate(best_start.tolist())]
    return codebooks, error


def _companded(x64: torch.Tensor, frac: torch.Tensor, sample: int = 1 << 16) -> torch.Tensor:
    """Points at quantiles `frac` of the measure with density p(x)^(1/3), the point density
    that minimises squared error; p is estimated from the gaps between sorted values (an
    evenly strided sample of them: a density needs no more)."""
    x64 = x64[:: max(1, x64.numel() // sample)]
    n = x64.numel()
    if n < 3 or x64[-1] <= x64[0]:
        return x64[(frac * n).long().clamp_(0, n - 1)]
    gap = x64.diff()
    density = (2.0 / (torch.cat([gap[:1], gap]) + torch.cat([gap, gap[-1:]])).clamp(min=1e-30)).pow(1 / 3)
    mass = 0.5 * (density[1:] + density[:-1]) * gap
    cdf = torch.cat([mass.new_zeros(1), mass.cumsum(0)])
    cdf = cdf / cdf[-1]
    j = torch.searchsorted(cdf, frac).clamp_(1, n - 1)
    t = (frac - cdf[j - 1]) / (cdf[j] - cdf[j - 1]).clamp(min=1e-300)
    return x64[j - 1] + t * (x64[j] - x64[j - 1])


def _exact_codebooks(
    x64: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, bit_choices: list[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Optimal 1-D k-means of sorted values for every bitwidth: one DP over cluster counts."""
    n = x64.numel()
    i = torch.arange(n + 1, device=x64.device)
    span = (i[None, :] - i[:, None]).double()  # span[j, e] = size of the group x[j:e]
    group_sse = (s2[None, :] - s2[:, None]) - (s1[None, :] - s1[:, None]).square() / span.clamp(min=1)
    group_sse = torch.where(span > 0, group_sse.clamp(min=0), torch.inf)
    k_max = min(n, 2 ** max(bit_choices))
    best = [group_sse[0]]  # best[k-1][e]: least error of x[:e] in k groups
    split = []
    for _ in range(1, k_max):
        value, arg = (best[-1][:, None] + group_sse).min(0)
        best.append(value)
        split.append(arg)

    codebooks, errors = [], []
    for b in bit_choices:
        k = min(2**b, n)
        ends = [n]
        for level in range(k - 1, 0, -1):
            ends.append(int(split[level - 1][ends[-1]]))
        bounds = ends[::-1]
        starts, stops = [0, *bounds[:-1]], bounds
        means = torch.stack([(s1[e] - s1[a]) / (e - a) for a, e in zip(starts, stops)])
        pad = means[-1].expand(2**b - k)  # more centres than values: repeat the last one
        codebooks.append(torch.cat([means, pad]).float())
        errors.append(best[k - 1][n])
    return codebooks, torch.stack(errors).clamp(min=0)


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


def joint_options(
    weights: torch.Tensor, bit_choices: list[int], min_keep: int = 1, points: int = 24,
    sample: int = 1 << 12, pool: int = 1 << 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The error of every (kept count, bitwidth) option of one layer, for the joint projection.

    Kept counts form a geometric ladder from `min_keep` to all weights; the kept set of a
    count is the largest-magnitude weights. Error = the pruned weights' squared sum + the
    k-means error of the kept ones with 2^b centres. Layers above `pool` weights are priced
    on a fixed random sample of `pool` of them (scaled up), so the table costs the same for
    any layer size. Above `sample` kept values a codebook is fitted on an evenly strided
    sample and its error measured on another one (interleaved, so 256 centres cannot
    overfit a small sample). Returns the kept counts (K,) and the errors (K, len(bit_choices)).
    """
    flat = weights.detach().flatten().float()
    n = flat.numel()
    if n > pool:
        flat = flat[torch.randint(n, (pool,), generator=torch.Generator().manual_seed(n)).to(flat.device)]
    scale = n / flat.numel()
    by_size = flat[flat.abs().argsort(descending=True)]
    tail = torch.cat([by_size.double().square().flip(0).cumsum(0).flip(0), by_size.new_zeros(1, dtype=torch.float64)])
    ladder = torch.logspace(math.log10(max(1, min_keep)), math.log10(n), points, dtype=torch.float64)
    keeps = torch.unique(ladder.round().long().clamp(max(1, min_keep), n))
    errors = []
    for k in keeps.tolist():
        kept = by_size[: max(1, round(k / scale))]
        stride = max(1, kept.numel() // sample)
        fit_on = kept[::stride]
        books, quant = fit_codebooks(fit_on, bit_choices, iters=15)
        if stride > 1:
            fit_on = kept[stride // 2 :: stride].double()
            quant = torch.stack([(fit_on - b.double()[assign(fit_on, b)]).square().sum() for b in books])
        errors.append(tail[kept.numel()].cpu() * scale + quant.cpu() * (k / fit_on.numel()))
    return keeps.cpu(), torch.stack(errors)

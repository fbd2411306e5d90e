"""The two projections of the method, as plain tensor math on any device.

* `knapsack_prune`: keep the weights with the largest w^2 / cost until the budget is met
  (0-1 knapsack, greedy by score). Found by a two-pass radix select on the scores' bit
  patterns instead of a full sort. `useless_weights`: the kept weights that read a unit the
  masks leave without inputs (the links between layers come from links.py).
* `fit_codebooks`: 1-D k-means with 2^b centres for several b at once, on sorted values
  with prefix sums, so one Lloyd step for every bitwidth is a single searchsorted.
* `solve_mckp_greedy`: the multiple-choice knapsack over per-layer (cost, distortion)
  options, greedy on each layer's lower convex hull; `solve_mckp_exact` is the exact
  dynamic programme used to measure the greedy's gap.
* `joint_options`: each layer's (kept count, bitwidth) options with their pruning plus
  quantization error, the table of the joint projection (one multiplier for both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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

    high = [k >> 16 for k in keys]
    hi_bucket, spare, _ = _cut_bucket(high, _HI, cost, budget)
    if hi_bucket < 0:
        return [torch.ones_like(w, dtype=torch.bool) for w in weights], 0.0
    low = [torch.masked_select(k, h == hi_bucket) & 0xFFFF for k, h in zip(keys, high)]
    lo_bucket, spare, counts = _cut_bucket(low, _LO, cost, spare)
    cut_key = (hi_bucket << 16) | lo_bucket

    masks = []
    for key, c, w, n_ties in zip(keys, cost.tolist(), weights, counts[:, lo_bucket].tolist()):
        take = min(n_ties, int(spare // c)) if spare > 0 else 0
        spare = spare - take * c if take == n_ties else -1.0  # the greedy stops at the first misfit
        keep = key > cut_key
        if take > 0:
            ties = key == cut_key
            keep |= ties if take == n_ties else ties & (ties.cumsum(0) <= take)
        masks.append(keep.view(w.shape))
    lam = torch.tensor([cut_key], dtype=torch.int32).view(torch.float32).item()
    return masks, lam



@dataclass(frozen=True)
class Link:
    """Layer `sink` reads the units of layer `source`: its input feature (Linear) or
    channel (Conv) i comes from unit i // `block` of the source."""

    source: int
    sink: int
    block: int


def useless_weights(masks: list[torch.Tensor], links: list[Link]) -> list[torch.Tensor]:
    """Per layer, the weights that read a unit left without inputs by `masks` (in model
    order, so that a unit fed only by useless weights counts as without inputs too)."""
    useless = [torch.zeros_like(m) for m in masks]
    for link in sorted(links, key=lambda k: k.source):
        kept = masks[link.source] & ~useless[link.source]
        dead = ~kept.flatten(1).any(dim=1)  # units (output rows) without a kept input
        reads_dead = dead.repeat_interleave(link.block)
        shape = [1] * masks[link.sink].dim()
        shape[1] = -1
        useless[link.sink] |= reads_dead.view(shape).expand_as(masks[link.sink])
    return useless


def _cut_bucket(
    buckets: list[torch.Tensor], n_buckets: int, cost: torch.Tensor, budget: float
) -> tuple[int, float, torch.Tensor]:
    """Highest bucket that no longer fits whole when filling from the top.

    Returns (-1, spare, counts) when every bucket fits; else the bucket and the budget left
    for it after all higher buckets are kept; `counts`: each layer's values per bucket.
    """
    counts = torch.stack([torch.bincount(b, minlength=n_buckets) for b in buckets])
    per_bucket = (counts.double() * cost[:, None]).sum(0)
    from_top = per_bucket.flip(0).cumsum(0).flip(0)  # cost of this bucket and all above
    over = torch.nonzero(from_top > budget)
    if over.numel() == 0:
        return -1, budget - float(from_top[0]), counts
    cut = int(over.max())
    above = float(from_top[cut + 1]) if cut + 1 < n_buckets else 0.0
    return cut, budget - above, counts


EXACT_BELOW = 128  # sets this small are clustered exactly when cold (Lloyd's local optima hurt most here)
FIT_SAMPLE = 1 << 16  # the deployed codebooks of larger kept sets are fitted on a random sample this big
N_STARTS = 3  # Lloyd's deterministic starts: evenly spaced quantiles, evenly spaced values, companded


def fit_codebooks(
    values: torch.Tensor, bit_choices: list[int], iters: int = 50, exact_below: int = EXACT_BELOW
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """1-D k-means with 2^b centres for every b in `bit_choices`: `fit_codebooks_many` of one set.
    Returns the sorted centres for each b (float32) and the squared error of each fit (float64)."""
    books, errors = fit_codebooks_many([values], torch.tensor([list(bit_choices)]), iters, exact_below)
    return books[0], errors[0]


def fit_codebooks_many(
    sets: list[torch.Tensor], bits: torch.Tensor, iters: int = 50, exact_below: int = EXACT_BELOW,
    measure_on: list[torch.Tensor | None] | None = None, sample: int | None = None,
    starts: list[list[torch.Tensor]] | None = None,
) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """1-D k-means of many sets of values at once: set i with 2^b centres for every b in row i
    of `bits` (sets x choices).

    Fewer than `exact_below` values and no `starts`: the optimal clustering, by dynamic
    programming. Otherwise Lloyd's algorithm from three deterministic starts (evenly spaced
    quantiles, evenly spaced values, points spread with density p^(1/3)); a centre left with no
    values is moved to split the cluster with the largest error; the best start wins. Every fit of every set is one
    segment of one batched run on sorted values with prefix sums, so an iteration costs a few
    tensor operations whatever the number of sets. `measure_on[i]`, when given, is where set
    i's error is measured (the fit stays that of set i). A set of more than `sample` values is
    fitted on a fixed random `sample` of them (256 centres need no more), its error scaled up
    from the sample's, so no large set is sorted. `starts[i][j]`, when given, are sorted centres
    to start fit (i, j) from instead of the three starts or the exact programme (a warm start:
    the codebooks of a previous fit of nearby values, which Lloyd's steps need only move a
    little, so a run pays the exact programme once, at its first projection). Returns per set
    the sorted centres for each choice (float32) and the squared errors (sets x choices, float64).
    """
    measure_on = list(measure_on or [None] * len(sets))
    flat = [v.detach().flatten().float() for v in sets]
    scale = torch.ones(len(sets), 1, dtype=torch.float64)
    for i, v in enumerate(flat):
        if sample is not None and v.numel() > sample:
            scale[i] = v.numel() / sample
            flat[i] = v[torch.randint(v.numel(), (sample,), generator=torch.Generator().manual_seed(v.numel())).to(v.device)]
    sorted_sets = [v.sort().values for v in flat]
    if any(x.numel() == 0 for x in sorted_sets):
        raise ValueError("cannot fit a codebook to an empty set of weights")
    bits = torch.as_tensor(bits).long().cpu()
    books: list[list[torch.Tensor]] = [[] for _ in sets]
    errors = torch.zeros(bits.shape, dtype=torch.float64)
    exact = [starts is None and x.numel() < exact_below for x in sorted_sets]
    small = [i for i, e in enumerate(exact) if e]
    if small:
        found, err = _exact_codebooks([sorted_sets[i] for i in small], bits[small])
        for i, b, e in zip(small, found, err):
            books[i], errors[i] = b, e
    cold, warm = [], []  # (set, column) of the other sets' fits that need Lloyd, without and with a start
    for i, x in enumerate(sorted_sets):
        if exact[i]:
            continue
        books[i] = [torch.empty(0)] * bits.shape[1]
        for j, b in enumerate(bits[i].tolist()):
            if x.numel() <= 2**b:  # every value its own centre
                books[i][j] = torch.cat([x, x[-1:].expand(2**b - x.numel())])
            elif starts is not None and starts[i][j].numel() == 2**b:
                warm.append((i, j))
            else:
                cold.append((i, j))
    for fits, given in ((cold, None), (warm, [starts[i][j] for i, j in warm] if warm else None)):
        if fits:
            found, err = _lloyd_codebooks(sorted_sets, [(i, int(bits[i, j])) for i, j in fits], iters, given)
            for (i, j), book, e in zip(fits, found, err.cpu()):
                books[i][j], errors[i, j] = book, e
    measured = [i for i, where in enumerate(measure_on) if where is not None]
    if measured:
        errors[measured] = _codebook_errors([measure_on[i] for i in measured], [books[i] for i in measured]).cpu()
    return books, errors * scale


class _Packed:
    """Sorted sets laid end to end (float64) with prefix sums; `shifted` adds each set's index
    times more than the whole value range, so one searchsorted finds positions within any set."""

    def __init__(self, sorted_sets: list[torch.Tensor]) -> None:
        dev = sorted_sets[0].device
        self.lengths = torch.tensor([x.numel() for x in sorted_sets], device=dev)
        self.base = torch.cumsum(self.lengths, 0) - self.lengths
        self.ends = self.base + self.lengths
        self.x = torch.cat(sorted_sets).double()
        self.width = float(self.x.max() - self.x.min()) + 1.0
        owner = torch.repeat_interleave(torch.arange(len(sorted_sets), device=dev), self.lengths)
        self.shifted = self.x + owner.double() * self.width
        zero = self.x.new_zeros(1)
        self.s1 = torch.cat([zero, self.x.cumsum(0)])
        self.s2 = torch.cat([zero, self.x.square().cumsum(0)])

    def positions(self, values: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Index of the first element >= value within the owner's set, for each value."""
        pos = torch.searchsorted(self.shifted, values + owner.double() * self.width)
        return torch.minimum(torch.maximum(pos, self.base[owner]), self.ends[owner])

    def cluster_bounds(self, c: torch.Tensor, has_next: torch.Tensor, owner: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The values [lo, hi) nearest each centre `c`: the centres lie in sorted segments (a
        codebook each, of set `owner`; `has_next`: not its segment's last); a value equal to a
        mid goes up, as in `assign`."""
        inner = has_next[:-1]
        pos = self.positions((c[:-1] + c[1:])[inner] / 2, owner[:-1][inner])
        lo, hi = self.base[owner].clone(), self.ends[owner].clone()
        hi[has_next] = pos
        lo[torch.roll(has_next, 1)] = pos
        return lo, hi

    def cluster_sse(self, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Squared error of the values [lo, hi) about each centre, from the prefix sums."""
        return (self.s2[hi] - self.s2[lo]) - 2 * c * (self.s1[hi] - self.s1[lo]) + c.square() * (hi - lo)

    def segment_sse(self, c: torch.Tensor, seg: torch.Tensor, has_next: torch.Tensor,
                    owner: torch.Tensor) -> torch.Tensor:
        """Squared error of each segment's codebook on its set (`seg`: each centre's segment)."""
        lo, hi = self.cluster_bounds(c, has_next, owner)
        per_centre = self.cluster_sse(c, lo, hi)
        return per_centre.new_zeros(int(seg[-1]) + 1).index_add_(0, seg, per_centre).clamp_(min=0)


def _codebook_errors(value_sets: list[torch.Tensor], books: list[list[torch.Tensor]]) -> torch.Tensor:
    """Squared error of each set of values on each of its sorted codebooks (sets x books, the
    same number of books for every set): every book of every set one segment of one packed search."""
    data = _Packed([v.detach().flatten().sort().values for v in value_sets])
    dev = data.x.device
    flat = [b for row in books for b in row]
    sizes = torch.tensor([b.numel() for b in flat], device=dev)
    seg = torch.repeat_interleave(torch.arange(len(flat), device=dev), sizes)
    owner = torch.arange(len(books), device=dev).repeat_interleave(len(books[0]))[seg]
    has_next = torch.ones_like(seg, dtype=torch.bool)
    has_next[sizes.cumsum(0) - 1] = False
    return data.segment_sse(torch.cat(flat).to(dev).double(), seg, has_next, owner).view(len(books), -1)


def _lloyd_codebooks(sorted_sets: list[torch.Tensor], fits: list[tuple[int, int]], iters: int,
                     starts: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Lloyd's algorithm for every fit (set, bits) from every start at once (see
    `fit_codebooks_many`), or from the one given start of each fit (`starts`); the best
    start's centres and error of each fit."""
    data = _Packed(sorted_sets)
    dev = data.x.device
    n_starts = N_STARTS if starts is None else 1
    fit_set = torch.tensor([i for i, _ in fits], device=dev).repeat_interleave(n_starts)  # fit-major segments
    sizes = (2 ** torch.tensor([b for _, b in fits], device=dev)).repeat_interleave(n_starts)
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=dev), sizes)
    owner = fit_set[seg]
    first = sizes.cumsum(0) - sizes
    if starts is None:
        frac = (torch.arange(int(sizes.sum()), device=dev) - first[seg] + 0.5).double() / sizes[seg]
        start = seg % N_STARTS
        n, base = data.lengths[owner], data.base[owner]
        x = data.x
        centres = torch.where(
            start == 0, x[base + (frac * n).long().clamp_(max=n - 1)],  # evenly spaced quantiles
            torch.where(start == 1, x[base] + frac * (x[base + n - 1] - x[base]),  # evenly spaced values
                        _companded(data, owner, frac)))  # the MSE-optimal point density
    else:
        centres = torch.cat(starts).to(dev).double()
    has_next = torch.ones_like(seg, dtype=torch.bool)
    has_next[first + sizes - 1] = False
    s1 = data.s1

    def reseed_empty(c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, seg: torch.Tensor,
                     first: torch.Tensor) -> torch.Tensor:
        """The r-th empty centre of a segment takes the upper half of its r-th worst cluster."""
        empty = hi == lo
        worst = torch.sort(-data.cluster_sse(c, lo, hi), stable=True).indices
        worst = worst[torch.sort(seg[worst], stable=True).indices]  # by segment, worst first
        empties = torch.nonzero(empty).flatten()
        counted = torch.cumsum(empty.long(), 0)
        seg_first = first[seg[empties]]
        rank = counted[empties] - 1 - counted[seg_first] + empty[seg_first].long()
        donor = worst[seg_first + rank]
        ok = (hi[donor] - lo[donor] >= 2) & ~empty[donor]
        empties, donor = empties[ok], donor[ok]
        mid = (lo[donor] + hi[donor]) // 2
        c = c.clone()
        c[empties] = (s1[hi[donor]] - s1[mid]) / (hi[donor] - mid)
        c[donor] = (s1[mid] - s1[lo[donor]]) / (mid - lo[donor])
        order = torch.sort(c, stable=True).indices
        return c[order[torch.sort(seg[order], stable=True).indices]]  # sorted within segments

    # Lloyd steps on the segments still moving: one that did not move is at its fixed point
    active = torch.ones(len(sizes), dtype=torch.bool, device=dev)
    for _ in range(iters):
        at = torch.nonzero(active[seg]).flatten()
        sub_sizes = sizes[active]
        sub_seg = torch.repeat_interleave(torch.arange(len(sub_sizes), device=dev), sub_sizes)
        c, sub_owner = centres[at], owner[at]
        lo, hi = data.cluster_bounds(c, has_next[at], sub_owner)
        count = (hi - lo).double()
        means = torch.where(count > 0, (s1[hi] - s1[lo]) / count.clamp(min=1), c)
        if bool((count == 0).any()):  # reseed within the segments that have an empty cluster
            hit = torch.zeros(len(sub_sizes), dtype=torch.bool, device=dev).index_fill_(0, sub_seg[count == 0], True)
            at_hit = torch.nonzero(hit[sub_seg]).flatten()
            hit_sizes = sub_sizes[hit]
            means[at_hit] = reseed_empty(means[at_hit], lo[at_hit], hi[at_hit],
                                         torch.repeat_interleave(torch.arange(len(hit_sizes), device=dev), hit_sizes),
                                         hit_sizes.cumsum(0) - hit_sizes)
        moved = torch.zeros(len(sub_sizes), dtype=torch.long, device=dev).index_add_(0, sub_seg, (means != c).long()) > 0
        centres[at] = means
        active[torch.nonzero(active).flatten()[~moved]] = False
        if not bool(active.any()):
            break

    error, best_start = data.segment_sse(centres, seg, has_next, owner).view(len(fits), n_starts).min(1)
    segments = centres.float().split(sizes.tolist())
    return [segments[f * n_starts + s] for f, s in enumerate(best_start.tolist())], error


def _companded(data: _Packed, owner: torch.Tensor, frac: torch.Tensor, sample: int = 1 << 10) -> torch.Tensor:
    """Points at quantiles `frac` of the measure with density p(x)^(1/3), the point density
    that minimises squared error, within each owner's set; p is estimated from the gaps between
    sorted values (an evenly strided sample of at most `sample` of them: a density needs no more)."""
    dev = data.x.device
    stride = (data.lengths // sample).clamp(min=1)
    m = (data.lengths + stride - 1) // stride  # sampled points per set
    sample_base = torch.cumsum(m, 0) - m
    who = torch.repeat_interleave(torch.arange(len(m), device=dev), m)
    local = torch.arange(int(m.sum()), device=dev) - sample_base[who]
    y = data.x[data.base[who] + local * stride[who]]
    last = local == m[who] - 1
    gap = torch.cat([y.diff(), y.new_zeros(1)])  # gap to the next point of the same set (0 after the last)
    right = torch.where(last, torch.roll(gap, 1), gap)
    left = torch.where(local == 0, gap, torch.roll(gap, 1))
    density = (2.0 / (left + right).clamp(min=1e-30)).pow(1 / 3)
    mass = torch.where(last, 0.0, 0.5 * (density + torch.roll(density, -1)) * gap)
    cdf = torch.cat([mass.new_zeros(1), mass.cumsum(0)])[:-1]  # at each point, from the start of all sets
    cdf = cdf - cdf[sample_base[who]]
    total = cdf[sample_base + m - 1]
    cdf = cdf / total.clamp(min=1e-300)[who]
    j = torch.searchsorted(cdf + 2.0 * who.double(), frac + 2.0 * owner.double())
    j = (j - sample_base[owner]).clamp(min=1, max=None)
    j = torch.minimum(j, (m[owner] - 1).clamp(min=1))
    at = sample_base[owner]
    lo_c, hi_c = cdf[at + j - 1], cdf[(at + j).clamp(max=len(y) - 1)]
    lo_y, hi_y = y[at + j - 1], y[(at + j).clamp(max=len(y) - 1)]
    t = (frac - lo_c) / (hi_c - lo_c).clamp(min=1e-300)
    value = lo_y + t * (hi_y - lo_y)
    degenerate = (m < 3) | (y[sample_base + m - 1] <= y[sample_base])
    quantile = y[at + (frac * m[owner]).long().clamp(max=m[owner] - 1)]
    return torch.where(degenerate[owner], quantile, value)


def _exact_codebooks(sorted_sets: list[torch.Tensor], bits: torch.Tensor
                     ) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Optimal 1-D k-means of small sorted sets for every choice: one dynamic programme over
    cluster counts for all the sets of a size class at once (padding repeats the last value,
    which no prefix x[:e] of a set's own values sees). A set of at most 2^b values is its own
    codebook (error 0; the last value repeats)."""
    books = [[torch.empty(0)] * bits.shape[1] for _ in sorted_sets]
    errors = torch.zeros(bits.shape, dtype=torch.float64)
    sizes = [x.numel() for x in sorted_sets]
    classes: dict[int, list[int]] = {}
    for i, n in enumerate(sizes):
        classes.setdefault(n.bit_length(), []).append(i)
    for members in classes.values():
        width = max(sizes[i] for i in members)
        dev = sorted_sets[members[0]].device
        x64 = torch.stack([torch.cat([sorted_sets[i], sorted_sets[i][-1:].expand(width - sizes[i])])
                           for i in members]).double()
        zero = x64.new_zeros(len(members), 1)
        s1 = torch.cat([zero, x64.cumsum(1)], 1)
        s2 = torch.cat([zero, x64.square().cumsum(1)], 1)
        i = torch.arange(width + 1, device=dev)
        span = (i[None, :] - i[:, None]).double()  # span[j, e] = size of the group x[j:e]
        group_sse = (s2[:, None, :] - s2[:, :, None]) - (s1[:, None, :] - s1[:, :, None]).square() / span.clamp(min=1)
        group_sse = torch.where(span > 0, group_sse.clamp(min=0), torch.inf)
        rows = bits[members]
        k_max = max([2**b for b in rows.unique().tolist() if 2**b < width], default=1)
        best = [group_sse[:, 0]]  # best[k-1][g, e]: least error of set g's x[:e] in k groups
        split = []
        for _ in range(1, k_max):
            value, arg = (best[-1][:, :, None] + group_sse).min(1)
            best.append(value)
            split.append(arg)
        n = torch.tensor([sizes[m] for m in members], device=dev)
        for col in range(bits.shape[1]):
            for b in rows[:, col].unique().tolist():
                k = 2**b
                for local in (rows[:, col] == b).nonzero().flatten().tolist():
                    if sizes[members[local]] <= k:
                        values = sorted_sets[members[local]]
                        books[members[local]][col] = torch.cat([values, values[-1:].expand(k - values.numel())]).float()
                pick = ((rows[:, col] == b) & (n > k)).nonzero().flatten()
                if pick.numel() == 0:
                    continue
                ends = [n[pick]]  # the groups' bounds, from the last back
                for level in range(k - 1, 0, -1):
                    ends.append(split[level - 1][pick, ends[-1]])
                bounds = torch.stack(ends[::-1], 1)
                starts = torch.cat([torch.zeros_like(bounds[:, :1]), bounds[:, :-1]], 1)
                means = (s1[pick[:, None], bounds] - s1[pick[:, None], starts]) / (bounds - starts).double()
                found = best[k - 1][pick, n[pick]].clamp(min=0).cpu()
                for r, local in enumerate(pick.tolist()):
                    books[members[local]][col] = means[r].float()
                    errors[members[local], col] = found[r]
    return books, errors


def assign(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre of a sorted codebook for every value (ties go up)."""
    mids = (codebook[:-1].double() + codebook[1:].double()) / 2
    return torch.searchsorted(mids, values.double(), right=True)


def dequantize(mask: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The float32 weight that a mask, a codebook and the codes of the kept weights (in flat
    order) stand for: each kept weight its centre, zeros elsewhere. The one place a weight is
    rebuilt, in training and from the file alike."""
    values = codebook.float().index_select(0, codes.long())
    return torch.zeros(mask.shape, dtype=torch.float32, device=codebook.device).masked_scatter_(mask.to(values.device), values)


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


def solve_mckp_greedy(
    cost: torch.Tensor, distortion: torch.Tensor, budget: float
) -> tuple[torch.Tensor, float]:
    """Pick one option per layer minimising total distortion within the budget.

    `cost` and `distortion` are (layers, options); an option with infinite cost is not
    allowed. Greedy on each layer's lower convex hull: start every layer at its cheapest
    option, then take upgrades in order of distortion saved per bit; a layer whose next
    upgrade does not fit stays where it is. Returns the chosen option per layer and the
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
    full: set[int] = set()
    lam = 0.0
    for slope, j, step in upgrades:
        if j in full:
            continue
        a, b = hulls[j][step], hulls[j][step + 1]
        extra = cost_l[j][b] - cost_l[j][a]
        if spent + extra <= budget:
            spent += extra
            choice[j] = b
        else:
            full.add(j)
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


FIT_BITS_UP_TO = 6  # above this, a table's k-means error is the high-resolution limit's: a quarter per extra bit
TABLE_ITERS = 15  # Lloyd steps of a table's fits from the cold starts
WARM_TABLE_ITERS = 5  # from the previous projection's codebooks: the fits go on from projection to projection


@dataclass
class OptionTables:
    """The joint projection's options: per layer the kept counts (K,) and the error of every
    (kept count, bitwidth) option (K, bitwidths); and the codebooks fitted to price them, the
    warm start of the next tables of nearby weights (`joint_options_many(starts=...)`): one row
    per fitted set, its codebooks for 1..FIT_BITS_UP_TO bits end to end (one tensor, cheap to
    keep in a saved state)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    books: torch.Tensor


def joint_options(
    weights: torch.Tensor, bit_choices: list[int], min_keep: int = 1, points: int = 24,
    sample: int = 1 << 12, pool: int = 1 << 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`joint_options_many` of one layer: its kept counts and errors."""
    return joint_options_many([weights], bit_choices, [min_keep], points, sample, pool).layers[0]


def joint_options_many(
    weights: list[torch.Tensor], bit_choices: list[int], min_keep: list[int], points: int = 24,
    sample: int = 1 << 12, pool: int = 1 << 16, starts: torch.Tensor | None = None,
) -> OptionTables:
    """The error of every (kept count, bitwidth) option of each layer, for the joint projection.

    Kept counts form a geometric ladder from `min_keep` to all weights; the kept set of a
    count is the largest-magnitude weights. Error = the pruned weights' squared sum + the
    k-means error of the kept ones with 2^b centres. Layers above `pool` weights are priced
    on a fixed random sample of `pool` of them (scaled up), so the table costs the same for
    any layer size. Above `sample` kept values a codebook is fitted on an evenly strided
    sample and its error measured on another one (interleaved, so 256 centres cannot
    overfit a small sample). All the codebooks of all layers are one `fit_codebooks_many`, for
    bitwidths up to FIT_BITS_UP_TO; beyond, each bit divides the error by 4 (Panter and Dite's
    high-resolution limit, D ~ 4^-b), which costs nothing instead of 3/4 of the centres.
    `starts`: the `books` of tables of weights of the same shapes, to start each fit from (one
    start instead of three or the exact programme, and WARM_TABLE_ITERS Lloyd steps instead of
    TABLE_ITERS: a projection's weights move little from the previous one's, so each
    projection's fits go on where the last ones stopped).
    """
    fit_sets, measure, ladders = [], [], []
    for w, low in zip(weights, min_keep):
        flat = w.detach().flatten().float()
        n = flat.numel()
        if n > pool:
            flat = flat[torch.randint(n, (pool,), generator=torch.Generator().manual_seed(n)).to(flat.device)]
        scale = n / flat.numel()
        by_size = flat[flat.abs().argsort(descending=True)]
        tail = torch.cat([by_size.double().square().flip(0).cumsum(0).flip(0), by_size.new_zeros(1, dtype=torch.float64)])
        ladder = torch.logspace(math.log10(max(1, low)), math.log10(n), points, dtype=torch.float64)
        keeps = torch.unique(ladder.round().long().clamp(max(1, low), n))
        kept_n = [max(1, round(k / scale)) for k in keeps.tolist()]
        for m in kept_n:
            stride = max(1, m // sample)
            fit_sets.append(by_size[:m:stride])
            measure.append(by_size[stride // 2 : m : stride] if stride > 1 else None)
        ladders.append((keeps, kept_n, scale, tail.cpu()))
    fitted = [b for b in bit_choices if b <= FIT_BITS_UP_TO]
    widths = [2**b for b in fitted]
    warm = starts is not None and tuple(starts.shape) == (len(fit_sets), sum(widths))
    books, quant = fit_codebooks_many(fit_sets, torch.tensor([fitted] * len(fit_sets)),
                                      iters=WARM_TABLE_ITERS if warm else TABLE_ITERS, measure_on=measure,
                                      starts=[list(row.split(widths)) for row in starts] if warm else None)
    beyond = torch.tensor([b for b in bit_choices if b > FIT_BITS_UP_TO])
    exact = torch.tensor([len(f) for f in fit_sets])[:, None] <= 2**beyond  # every value its own centre
    quant = torch.cat([quant, torch.where(exact, 0.0, quant[:, -1:] * 4.0 ** -(beyond - fitted[-1]))], 1)
    tables, row = [], 0
    for keeps, kept_n, scale, tail in ladders:
        sizes = torch.tensor([(len(m) if m is not None else len(f)) for f, m in
                              zip(fit_sets[row : row + len(kept_n)], measure[row : row + len(kept_n)])], dtype=torch.float64)
        errors = tail[kept_n][:, None] * scale + quant[row : row + len(kept_n)] * (keeps.double() / sizes)[:, None]
        tables.append((keeps.cpu(), errors))
        row += len(kept_n)
    return OptionTables(tables, torch.stack([torch.cat(b) for b in books]))

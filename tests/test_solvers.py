"""The projections against independent references: sort-based greedy, dense Lloyd, exhaustive
search, and the exact dynamic programme for the bitwidth knapsack."""
from itertools import combinations

import pytest
import torch

from jointcomp.projector import LayerSpec, Projector
from jointcomp.budget import Budget, LayerBounds, Accounting
from jointcomp.solvers import (solve_mckp_greedy, fit_codebooks, fit_codebooks_many, joint_options, knapsack_prune,
                                  solve_mckp_exact)


def sorted_greedy(weights, costs, budget, min_keep=None):
    """Reference: full stable sort by w^2/c, keep the prefix up to the first misfit."""
    scores = []
    for j, (w, c) in enumerate(zip(weights, costs)):
        s = w.flatten() ** 2 / c
        if min_keep and min_keep[j]:
            s[torch.argsort(s, descending=True, stable=True)[: min_keep[j]]] = float("inf")
        scores.append(s)
    s = torch.cat(scores)
    cost = torch.cat([torch.full((w.numel(),), float(c), dtype=torch.float64) for w, c in zip(weights, costs)])
    order = torch.sort(s, descending=True, stable=True).indices
    n = int((cost[order].cumsum(0) <= budget).long().cumprod(0).sum())
    keep = torch.zeros(len(s), dtype=torch.bool)
    keep[order[:n]] = True
    return keep


@pytest.mark.parametrize("seed", range(60))
def test_pruning_matches_sorted_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    n_layers = int(torch.randint(1, 6, (1,), generator=g))
    weights = [torch.randn(int(torch.randint(1, 300, (1,), generator=g)), generator=g) for _ in range(n_layers)]
    if seed % 3 == 0:  # many exact ties
        weights = [(w * 2).round() / 2 for w in weights]
    costs = [float(torch.randint(1, 9, (1,), generator=g)) for _ in weights]
    total = sum(c * w.numel() for c, w in zip(costs, weights))
    budget = float(torch.rand(1, generator=g)) * total
    masks, lam = knapsack_prune(weights, costs, budget)
    got = torch.cat([m.flatten() for m in masks])
    assert torch.equal(got, sorted_greedy(weights, costs, budget))
    spent = sum(c * int(m.sum()) for c, m in zip(costs, masks))
    assert spent <= budget
    # the multiplier separates kept from pruned scores
    scores = torch.cat([w.flatten() ** 2 / c for w, c in zip(weights, costs)])
    assert scores[got].min() >= lam if got.any() else True
    assert scores[~got].max() <= lam if (~got).any() else lam == 0


def test_pruning_min_keep_and_everything_fits():
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(100, generator=g), torch.randn(50, generator=g) * 1e-3]
    masks, _ = knapsack_prune(weights, [2.0, 2.0], budget=2.0 * 60, min_keep=[0, 20])
    assert int(masks[1].sum()) >= 20
    assert torch.equal(torch.cat([m.flatten() for m in masks]), sorted_greedy(weights, [2.0, 2.0], 120.0, [0, 20]))
    masks, lam = knapsack_prune(weights, [2.0, 2.0], budget=1e9)
    assert all(bool(m.all()) for m in masks) and lam == 0.0


def dense_lloyd(x, k, start, iters=50):
    """Reference: textbook Lloyd with a dense distance matrix from a quantile or value-grid start."""
    xs = x.double().sort().values
    n = len(xs)
    frac = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    c = xs[(frac * n).long().clamp(max=n - 1)] if start == "quantile" else xs[0] + frac * (xs[-1] - xs[0])
    for _ in range(iters):
        a = (xs[:, None] - c[None, :]).abs().argmin(1)
        new = torch.stack([xs[a == i].mean() if (a == i).any() else c[i] for i in range(k)])
        if torch.equal(new, c):
            break
        c = new
    a = (xs[:, None] - c[None, :]).abs().argmin(1)
    return float(((xs - c[a]) ** 2).sum())


@pytest.mark.parametrize("seed", range(10))
def test_kmeans_no_worse_than_dense_lloyd(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, generator=g) * torch.rand(2000, generator=g)  # heavy-tailed, like weights
    bits = [1, 2, 3, 4, 5]
    books, dist = fit_codebooks(x, bits, exact_below=0)
    for b, book, d in zip(bits, books, dist.tolist()):
        assert len(book) == 2**b
        assert torch.all(book[1:] >= book[:-1])
        best_start = min(dense_lloyd(x, 2**b, "quantile"), dense_lloyd(x, 2**b, "value"))
        assert d <= best_start * (1 + 1e-9) + 1e-9


def optimal_1d_kmeans(xs, k):
    """Exhaustive: the best split of sorted values into k contiguous groups."""
    xs = xs.double().sort().values
    best = float("inf")
    for cuts in combinations(range(1, len(xs)), k - 1):
        bounds = (0, *cuts, len(xs))
        sse = sum(float(((xs[a:b] - xs[a:b].mean()) ** 2).sum()) for a, b in zip(bounds[:-1], bounds[1:]))
        best = min(best, sse)
    return best


def test_small_sets_get_the_exhaustive_optimum():
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(11, generator=g) * torch.rand(11, generator=g)
        books, dist = fit_codebooks(x, [1, 2, 4])
        for b, book, d in zip((1, 2, 4), books, dist.tolist()):
            expected = optimal_1d_kmeans(x, 2**b) if 2**b < len(x) else 0.0
            assert d == pytest.approx(expected, abs=1e-9)
            nearest = (x.double()[:, None] - book.double()[None, :]).abs().min(1).values
            assert float((nearest**2).sum()) == pytest.approx(expected, abs=1e-6)


LLOYD_GAP_LIMIT = 0.2  # Lloyd finds a local optimum: measured mean 4.4%, worst 14% (600 values)


def test_lloyd_close_to_optimal_on_weight_sized_sets():
    gaps = []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(600, generator=g) * torch.rand(600, generator=g)
        _, lloyd = fit_codebooks(x, [1, 2, 3, 4, 5], exact_below=0)
        _, exact = fit_codebooks(x, [1, 2, 3, 4, 5], exact_below=10_000)
        assert torch.all(lloyd >= exact - 1e-9)
        gaps += ((lloyd - exact) / exact).tolist()
    mean_gap = sum(gaps) / len(gaps)
    assert max(gaps) <= LLOYD_GAP_LIMIT, f"mean {mean_gap:.2%}, max {max(gaps):.2%}"


def nearest_sse(x: torch.Tensor, book: torch.Tensor) -> float:
    return float(((x.double()[:, None] - book.double()[None, :]).abs().min(1).values ** 2).sum())


def test_a_warm_start_at_the_optimum_stays_there():
    """The optimal codebook is a fixed point of Lloyd's steps: started there, a fit keeps it,
    where Lloyd's cold starts find worse local optima."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, generator=g) * torch.rand(600, generator=g)
    bits = torch.tensor([[1, 2, 3, 4, 5]])
    optimal, exact = fit_codebooks_many([x], bits, exact_below=10_000)
    _, cold = fit_codebooks_many([x], bits, exact_below=0)
    books, warm = fit_codebooks_many([x], bits, exact_below=0, starts=optimal)
    assert bool((cold > exact * (1 + 1e-6)).any())  # the cold starts miss the optimum somewhere
    assert torch.allclose(warm, exact, rtol=1e-9, atol=1e-12)
    for book, best in zip(books[0], optimal[0]):
        assert torch.allclose(book, best)


def test_a_warm_start_from_nearby_values_is_as_good_as_three_cold_starts():
    """A projection's fits start from the previous projection's codebooks: on values that moved a
    little they land as close to the optimum as Lloyd's three cold starts do (LLOYD_GAP_LIMIT)."""
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        before = torch.randn(600, generator=g) * torch.rand(600, generator=g)
        x = before + 0.02 * before.std() * torch.randn(600, generator=g)
        bits = torch.tensor([[1, 2, 3, 4, 5]])
        old, _ = fit_codebooks_many([before], bits, exact_below=0)
        books, warm = fit_codebooks_many([x], bits, exact_below=0, starts=old)
        _, exact = fit_codebooks(x, [1, 2, 3, 4, 5], exact_below=10_000)
        for j, book in enumerate(books[0]):
            assert len(book) == 2 ** int(bits[0, j]) and torch.all(book[1:] >= book[:-1])
            assert float(warm[0, j]) == pytest.approx(nearest_sse(x, book), rel=1e-6)  # the error is the book's
            assert nearest_sse(x, book) <= nearest_sse(x, old[0][j]) + 1e-9  # Lloyd's steps never add error
        assert torch.all(warm[0] >= exact - 1e-9)
        assert float(((warm[0] - exact) / exact).max()) <= LLOYD_GAP_LIMIT


def test_measured_errors_are_each_codebook_on_the_other_values():
    """`measure_on`: a fit's error is that of its codebook on other values (the tables' interleaved
    sample), values on a mid between two centres included."""
    g = torch.Generator().manual_seed(5)
    sets = [torch.randn(n, generator=g) for n in (300, 40, 1000)]
    others = [torch.randn(n, generator=g) for n in (500, 7, 90)]
    bits = torch.tensor([[1, 2, 3, 5]] * 3)
    books, _ = fit_codebooks_many(sets, bits, exact_below=0)
    others[0] = torch.cat([others[0], (books[0][1][:-1] + books[0][1][1:]) / 2])  # exactly on the mids
    again, errors = fit_codebooks_many(sets, bits, exact_below=0, measure_on=others)
    for i, (where, row) in enumerate(zip(others, again)):
        for j, book in enumerate(row):
            assert float(errors[i, j]) == pytest.approx(nearest_sse(where, book), rel=1e-9, abs=1e-12)


def test_small_sets_are_exact_when_cold_and_go_on_from_a_warm_start():
    """Below EXACT_BELOW a cold fit is the optimum; from a start (the previous projection's
    codebooks) Lloyd's steps go on from it: the optimum of the same values stays, and a worse
    start only gets better, its error the book's own."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(90, generator=g) * torch.rand(90, generator=g)
    bits = torch.tensor([[1, 2, 3, 4]])
    optimal, exact = fit_codebooks_many([x], bits)
    local, lloyd = fit_codebooks_many([x], bits, exact_below=0)
    assert torch.all(exact <= lloyd + 1e-12) and bool((exact < lloyd * (1 - 1e-6)).any())
    _, stays = fit_codebooks_many([x], bits, starts=optimal)
    assert torch.allclose(stays, exact, rtol=1e-9, atol=1e-12)
    _, from_local = fit_codebooks_many([x], bits, starts=local)  # no exact programme: Lloyd's optimum stays
    assert torch.all(from_local <= lloyd + 1e-12) and bool((from_local > exact * (1 + 1e-6)).any())
    spread = [torch.linspace(float(x.min()), float(x.max()), 2**b) for b in bits[0].tolist()]
    books, warm = fit_codebooks_many([x], bits, starts=[spread])
    for j, book in enumerate(books[0]):
        assert float(warm[0, j]) == pytest.approx(nearest_sse(x, book), rel=1e-6)
        assert nearest_sse(x, book) <= nearest_sse(x, spread[j]) + 1e-9
        assert float(warm[0, j]) >= float(exact[0, j]) - 1e-9


def test_quantize_keeps_zero_exact_and_uses_the_codebook():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g)
    proj = Projector([LayerSpec("w", (40, 30), LayerBounds())], Accounting())
    masks, _ = proj.prune([w], torch.tensor([3]), Budget(3 * 300))
    alloc = proj.quantize([w], masks, Budget(3 * 300), bits=torch.tensor([3]))
    q = alloc.values[0]
    assert torch.all(q[~masks[0]] == 0)
    assert torch.all(q[masks[0]] != 0) or alloc.codebooks[0].eq(0).any()
    assert set(q[masks[0]].unique().tolist()) <= set(alloc.codebooks[0].tolist())
    assert len(alloc.codebooks[0]) == 8
    # each kept value went to its nearest centre
    dist = (w[masks[0]][:, None] - alloc.codebooks[0][None, :]).abs()
    assert torch.allclose(dist.min(1).values, (w[masks[0]] - q[masks[0]]).abs())


def random_mckp(g, layers=6, options=8):
    nnz = torch.randint(5, 40, (layers, 1), generator=g)
    bits = torch.arange(1, options + 1)[None, :]
    cost = (bits * nnz).double()
    scale = torch.rand(layers, 1, generator=g, dtype=torch.float64) * 10
    dist = scale * 4.0 ** (-bits.double()) * (1 + 0.3 * torch.rand(layers, options, generator=g, dtype=torch.float64))
    dist = dist.sort(1, descending=True).values
    budget = int(cost[:, 0].sum() + torch.rand(1, generator=g) * (cost[:, -1].sum() - cost[:, 0].sum()))
    return cost, dist, budget


# Greedy on convex hulls vs the exact DP, measured on these seeded instances:
# 6 layers: mean gap 2.0%, worst 27%; 20 layers: mean 0.6%, worst 3.6%. The gap comes from
# the one upgrade the greedy cannot take whole, so it shrinks as layers grow.
@pytest.mark.parametrize("layers, instances, mean_limit, max_limit", [(6, 200, 0.025, 0.30), (20, 60, 0.01, 0.05)])
def test_greedy_bitwidths_close_to_exact(layers, instances, mean_limit, max_limit):
    g = torch.Generator().manual_seed(0)
    gaps = []
    for _ in range(instances):
        cost, dist, budget = random_mckp(g, layers=layers)
        pick, lam = solve_mckp_greedy(cost, dist, budget)
        exact = solve_mckp_exact(cost, dist, budget)
        rows = torch.arange(len(pick))
        assert float(cost[rows, pick].sum()) <= budget
        assert float(cost[rows, exact].sum()) <= budget
        greedy_d, exact_d = float(dist[rows, pick].sum()), float(dist[rows, exact].sum())
        assert greedy_d >= exact_d - 1e-12
        gaps.append((greedy_d - exact_d) / exact_d)
    mean_gap, max_gap = sum(gaps) / len(gaps), max(gaps)
    assert mean_gap <= mean_limit and max_gap <= max_limit, f"mean gap {mean_gap:.2%}, max {max_gap:.2%}"


def test_bitwidth_bounds_are_honoured():
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(200, generator=g), torch.randn(300, generator=g)]
    specs = [LayerSpec("a", (200,), LayerBounds(min_bits=6)), LayerSpec("b", (300,), LayerBounds(max_bits=2))]
    proj = Projector(specs, Accounting())
    masks = [torch.ones(200, dtype=torch.bool), torch.ones(300, dtype=torch.bool)]
    alloc = proj.quantize(w, masks, Budget(8 * 500))
    assert alloc.bits.tolist()[0] >= 6 and alloc.bits.tolist()[1] <= 2
    assert alloc.size_bits <= 8 * 500


def test_solve_mckp_greedy_reports_infeasible():
    cost = torch.tensor([[10.0, 20.0]])
    with pytest.raises(ValueError, match="over the budget"):
        solve_mckp_greedy(cost, torch.tensor([[1.0, 0.5]]), budget=5)


def test_joint_options_price_pruning_exactly():
    """With at most 2^b kept values a codebook is exact, so the error is the pruned weights' squares."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3000, generator=g)
    keeps, errors = joint_options(w, list(range(1, 9)))
    smallest_first = w.double().square().sort().values
    for i, k in enumerate(keeps.tolist()):
        if k <= 256:
            assert float(errors[i, 7]) == pytest.approx(float(smallest_first[: 3000 - k].sum()), rel=1e-9, abs=1e-9)
    assert bool((errors[:, :-1] >= errors[:, 1:] - 1e-9).all())  # more bits never hurt


def test_option_tables_are_made_once_for_the_same_weights_and_starts():
    """A deployable model tried at several budgets (trim_to_fit) prices its options once; weights
    that moved, or other starts, get tables of their own, those a fresh projector makes."""
    g = torch.Generator().manual_seed(6)
    weights = [torch.randn(40, 30, generator=g), torch.randn(10, 40, generator=g)]
    projector = Projector([LayerSpec(f"w{i}", tuple(w.shape)) for i, w in enumerate(weights)], Accounting())
    first = projector.shared_tables(weights)
    assert projector.shared_tables([w.clone() for w in weights]) is first
    warm = projector.shared_tables(weights, first.books)
    assert warm is not first and projector.shared_tables(weights, first.books) is warm
    weights[1].mul_(1.5)
    moved = projector.shared_tables(weights)
    fresh = Projector(projector.specs, Accounting()).shared_tables(weights)
    for (keeps, errors), (fresh_keeps, fresh_errors) in zip(moved.layers, fresh.layers):
        assert torch.equal(keeps, fresh_keeps) and torch.equal(errors, fresh_errors)
    assert not torch.equal(moved.layers[1][1], first.layers[1][1])


def test_joint_projection_moves_bits_up_where_two_knapsacks_cannot():
    """A layer whose weights are many distinct values needs bits; the pruning knapsack at one
    bit spends the whole budget on weights, and the bitwidth knapsack then has no room. The
    joint projection trades kept weights for bits and ends with less error."""
    g = torch.Generator().manual_seed(6)
    wide = torch.linspace(-1, 1, 4000)[torch.randperm(4000, generator=g)]  # needs bits, not weights
    spiky = torch.randn(4000, generator=g) * (torch.rand(4000, generator=g) < 0.05)  # needs few weights
    weights = [wide, spiky]
    proj = Projector([LayerSpec("wide", (4000,)), LayerSpec("spiky", (4000,))], Accounting())
    budget = Budget(32 * 8000 / 40)

    joint = proj.joint(weights, budget)
    masks, _ = proj.prune(weights, torch.tensor([1, 1]), budget)
    two_step = proj.quantize(weights, masks, budget)

    def error(values):
        return sum(float((w - v).square().sum()) for w, v in zip(weights, values))

    assert joint.size_bits <= budget.bits and two_step.size_bits <= budget.bits
    assert joint.bits.tolist()[0] >= 2 and two_step.bits.tolist()[0] == 1
    assert error(joint.values) < error(two_step.values)


def test_joint_projection_honours_bounds():
    g = torch.Generator().manual_seed(7)
    w = [torch.randn(500, generator=g), torch.randn(800, generator=g)]
    specs = [LayerSpec("a", (500,), LayerBounds(min_bits=5, min_density=0.5)), LayerSpec("b", (800,), LayerBounds(max_bits=2))]
    alloc = Projector(specs, Accounting()).joint(w, Budget(6 * 1300))
    assert alloc.bits.tolist()[0] >= 5 and alloc.bits.tolist()[1] <= 2
    assert int(alloc.masks[0].sum()) >= 250
    assert alloc.size_bits <= 6 * 1300

"""kNN and farthest-point sampling on ragged batches: torch fallback against brute-force numpy,
against torch-cluster when it is installed, block planning, edge cases and input validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcfm.ops import cluster
from pcfm.ops.cluster import fps, knn, knn_graph

HAS_TORCH_CLUSTER = cluster.torch_cluster_available()
needs_torch_cluster = pytest.mark.skipif(
    not HAS_TORCH_CLUSTER, reason="torch_cluster is not importable: cannot compare the fallback with it"
)


def ragged(sizes, dim=3, seed=0):
    """Random float positions (no distance ties) and the sorted batch vector of ``sizes``."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    return torch.rand(len(batch), dim, generator=generator) * 100.0, batch


def brute_knn(x, y, k, batch_x, batch_y, exclude_self=False):
    """{(query, neighbour)} by full sorting in float64, one query at a time."""
    x, y = x.double().numpy(), y.double().numpy()
    batch_x, batch_y = batch_x.numpy(), batch_y.numpy()
    pairs = set()
    for query in range(len(y)):
        candidates = np.flatnonzero(batch_x == batch_y[query])
        if exclude_self:
            candidates = candidates[candidates != query]
        dist = ((x[candidates] - y[query]) ** 2).sum(1)
        pairs.update((query, int(c)) for c in candidates[np.argsort(dist)[:k]])
    return pairs


def brute_fps(pos, batch, counts, starts=None):
    """Per-event FPS in float64: the textbook loop (start, then farthest from the chosen set)."""
    pos, batch = pos.double().numpy(), batch.numpy()
    picks = []
    for event, count in enumerate(counts):
        members = np.flatnonzero(batch == event)
        if count == 0:
            continue
        chosen = [0 if starts is None else starts[event]]
        dist = ((pos[members] - pos[members[chosen[0]]]) ** 2).sum(1)
        while len(chosen) < count:
            chosen.append(int(dist.argmax()))
            dist = np.minimum(dist, ((pos[members] - pos[members[chosen[-1]]]) ** 2).sum(1))
        picks.extend(members[chosen].tolist())
    return picks


def pairs_of(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


# Events of 1 point, fewer points than k, an empty event (event 3 has no points) and large ones.
SIZES = [1, 5, 40, 0, 2, 300, 17, 1, 120]


@pytest.fixture(params=["default blocks", "tiny blocks"])
def block_budget(request, monkeypatch):
    """Run with the real block size and with one so small that events are split and grouped."""
    if request.param == "tiny blocks":
        monkeypatch.setitem(cluster._BLOCK_ELEMENTS, "cpu", 2000)
    return request.param


@pytest.mark.parametrize("k", [1, 4, 16])
def test_knn_torch_matches_brute_force(k, block_budget):
    x, batch_x = ragged(SIZES, seed=1)
    y, batch_y = ragged([3, 0, 7, 2, 1, 25, 0, 4, 9], seed=2)
    edges = knn(x, y, k, batch_x, batch_y, backend="torch")
    assert edges.dtype == torch.long and edges.shape[0] == 2
    assert pairs_of(edges) == brute_knn(x, y, k, batch_x, batch_y)
    assert len(pairs_of(edges)) == edges.shape[1]  # no duplicated edge


def test_knn_lists_queries_in_order_and_neighbours_nearest_first(block_budget):
    x, batch_x = ragged(SIZES, seed=3)
    edges = knn(x, x, 6, batch_x, batch_x, backend="torch")
    query, neighbour = edges
    assert bool((query[1:] >= query[:-1]).all())
    dist = (x[query] - x[neighbour]).pow(2).sum(1)
    same_query = query[1:] == query[:-1]
    assert bool((dist[1:][same_query] >= dist[:-1][same_query]).all())


@pytest.mark.parametrize("loop", [False, True])
def test_knn_graph_matches_brute_force(loop, block_budget):
    pos, batch = ragged(SIZES, seed=4)
    k = 8
    edge_index = knn_graph(pos, k, batch, loop=loop, backend="torch")
    expected = brute_knn(pos, pos, k, batch, batch, exclude_self=not loop)
    # source_to_target: row 1 is the centre, row 0 its neighbour.
    assert {(centre, neighbour) for neighbour, centre in pairs_of(edge_index)} == expected
    reversed_flow = knn_graph(pos, k, batch, loop=loop, flow="target_to_source", backend="torch")
    assert torch.equal(reversed_flow, edge_index.flip(0))
    degree = torch.bincount(edge_index[1], minlength=len(pos))
    event_size = torch.tensor(SIZES)[batch]
    assert torch.equal(degree, (event_size - (0 if loop else 1)).clamp(max=k))
    if not loop:
        assert bool((edge_index[0] != edge_index[1]).all())


def test_knn_graph_without_batch_is_one_event():
    pos, _ = ragged([150], seed=5)
    edge_index = knn_graph(pos, 5, backend="torch")
    expected = brute_knn(pos, pos, 5, torch.zeros(150, dtype=torch.long), torch.zeros(150, dtype=torch.long), True)
    assert {(c, n) for n, c in pairs_of(edge_index)} == expected


def test_knn_very_unequal_event_sizes(monkeypatch):
    # One event of 1500 points among events of 1 to 3 points; blocks far smaller than the big event.
    monkeypatch.setitem(cluster._BLOCK_ELEMENTS, "cpu", 30_000)
    sizes = [1, 2, 1500, 3, 1, 2, 1]
    pos, batch = ragged(sizes, seed=6)
    edge_index = knn_graph(pos, 10, batch, backend="torch")
    assert {(c, n) for n, c in pairs_of(edge_index)} == brute_knn(pos, pos, 10, batch, batch, True)


def test_knn_in_float64_and_2d():
    x, batch = ragged([30, 50], dim=2, seed=7)
    edges = knn(x.double(), x.double(), 3, batch, batch, backend="torch")
    assert pairs_of(edges) == brute_knn(x, x, 3, batch, batch)


def test_plan_blocks_respects_budget_and_covers_every_query_once():
    size_x = [5, 0, 1, 400, 3, 3, 90, 7, 0, 2]
    size_y = [5, 4, 1, 400, 0, 3, 90, 7, 3, 2]
    budget = 1000
    covered = {}
    for first, end, query_start, query_count in cluster._plan_blocks(size_x, size_y, budget):
        width = max(size_x[first:end])
        assert (end - first) * query_count * width <= budget or (end - first == 1 and query_count == 1)
        for event in range(first, end):
            for query in range(query_start, min(query_start + query_count, size_y[event])):
                covered[(event, query)] = covered.get((event, query), 0) + 1
    # Every query of an event with points in x is covered exactly once (queries of an event
    # without points may ride along inside a group: they find no neighbour).
    expected = {(e, q) for e in range(len(size_x)) if size_x[e] for q in range(size_y[e])}
    assert expected <= set(covered) and set(covered.values()) == {1}


def test_fps_torch_matches_brute_force_ratio():
    pos, batch = ragged(SIZES, seed=8)
    picks = fps(pos, batch, ratio=0.25, backend="torch")
    counts = [math.ceil(0.25 * n) for n in SIZES]
    assert picks.tolist() == brute_fps(pos, batch, counts)


def test_fps_torch_matches_brute_force_num():
    pos, batch = ragged(SIZES, seed=9)
    picks = fps(pos, batch, num=12, backend="torch")
    counts = [min(12, n) for n in SIZES]
    assert picks.tolist() == brute_fps(pos, batch, counts)


def test_fps_ratio_counts_use_float32_like_torch_cluster():
    # 0.3 * 50 rounds to 15.000001 in float32, so torch-cluster takes 16 centres, not 15.
    pos, batch = ragged([50, 3], seed=10)
    picks = fps(pos, batch, ratio=0.3, backend="torch")
    assert torch.bincount(batch[picks]).tolist() == [16, 1]


def test_fps_ratio_one_orders_every_point():
    pos, batch = ragged([6, 1, 9], seed=11)
    picks = fps(pos, batch, ratio=1.0, backend="torch")
    assert sorted(picks.tolist()) == list(range(16))
    assert picks.tolist() == brute_fps(pos, batch, [6, 1, 9])


def test_fps_random_start_follows_the_generator():
    pos, batch = ragged([50, 1, 80, 0, 33], seed=12)
    first = fps(pos, batch, num=5, random_start=True, generator=torch.Generator().manual_seed(3), backend="torch")
    again = fps(pos, batch, num=5, random_start=True, generator=torch.Generator().manual_seed(3), backend="torch")
    other = fps(pos, batch, num=5, random_start=True, generator=torch.Generator().manual_seed(4), backend="torch")
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Each event is a valid FPS from its drawn start: the reference from the same starts agrees.
    sizes = torch.tensor([50, 1, 80, 0, 33])
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    starts = (torch.rand(5, generator=torch.Generator().manual_seed(3)).double() * sizes).long()
    assert first.tolist() == brute_fps(pos, batch, [5, 1, 5, 0, 5], starts=starts.tolist())
    assert [int(p) for p in first[[0, 5, 6, 11]]] == (ptr[:-1] + starts)[[0, 1, 2, 4]].tolist()


@pytest.mark.parametrize("backend", ["torch", pytest.param("torch_cluster", marks=needs_torch_cluster)])
def test_empty_inputs(backend):
    empty = torch.empty(0, 3)
    no_batch = torch.empty(0, dtype=torch.long)
    assert knn(empty, empty, 4, backend=backend).shape == (2, 0)
    assert knn(empty, torch.rand(5, 3), 4, no_batch, torch.zeros(5, dtype=torch.long), backend=backend).shape == (2, 0)
    assert knn(torch.rand(5, 3), empty, 4, torch.zeros(5, dtype=torch.long), no_batch, backend=backend).shape == (2, 0)
    graph = knn_graph(empty, 4, no_batch, backend=backend)
    assert graph.shape == (2, 0) and graph.dtype == torch.long
    centres = fps(empty, no_batch, ratio=0.5, backend=backend)
    assert centres.shape == (0,) and centres.dtype == torch.long


def test_single_point_events_have_no_neighbour_without_loop():
    pos, batch = ragged([1, 1, 1], seed=13)
    assert knn_graph(pos, 3, batch, backend="torch").shape == (2, 0)
    assert knn_graph(pos, 3, batch, loop=True, backend="torch").tolist() == [[0, 1, 2], [0, 1, 2]]
    assert fps(pos, batch, num=4, backend="torch").tolist() == [0, 1, 2]


def test_auto_backend_without_torch_cluster_uses_torch(monkeypatch):
    monkeypatch.setattr(cluster, "_load_torch_cluster", lambda: (None, "ModuleNotFoundError: no torch_cluster"))
    pos, batch = ragged(SIZES, seed=14)
    assert torch.equal(knn_graph(pos, 5, batch), knn_graph(pos, 5, batch, backend="torch"))
    assert torch.equal(fps(pos, batch, ratio=0.3), fps(pos, batch, ratio=0.3, backend="torch"))
    with pytest.raises(ImportError, match="backend='torch_cluster' was asked for but torch_cluster cannot be imported"):
        knn_graph(pos, 5, batch, backend="torch_cluster")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, b: knn(p, p[:, :2], 3), "x and y must have as many coordinates, got 3 and 2"),
        (lambda p, b: knn(p, p, 3, b, None), "give both batch_x and batch_y, or neither"),
        (lambda p, b: knn(p, p, 0), "k must be an integer >= 1, got 0"),
        (lambda p, b: knn_graph(p, -2), "k must be an integer >= 1, got -2"),
        (lambda p, b: knn_graph(p, 2.5), "k must be an integer >= 1, got 2.5"),
        (lambda p, b: knn_graph(p, 3, b.flip(0)), "batch must be sorted"),
        (lambda p, b: knn_graph(p, 3, b[:-1]), "batch has 9 entries for 10 points"),
        (lambda p, b: knn_graph(p, 3, b.int()), "batch must be an int64 tensor"),
        (lambda p, b: knn_graph(p, 3, b - 1), "batch has negative event indices"),
        (lambda p, b: knn_graph(p[:, 0], 3), r"pos must have shape \[N, D\], got \(10,\)"),
        (lambda p, b: knn_graph(p.long(), 3), "pos must be a floating-point tensor"),
        (lambda p, b: knn_graph(p, 3, flow="up"), "flow must be 'source_to_target' or 'target_to_source'"),
        (lambda p, b: knn_graph(p, 3, backend="cuda"), "backend must be one of"),
        (lambda p, b: fps(p, b), "give exactly one of ratio and num"),
        (lambda p, b: fps(p, b, ratio=0.5, num=2), "give exactly one of ratio and num"),
        (lambda p, b: fps(p, b, ratio=1.5), r"ratio must be in \(0, 1\], got 1.5"),
        (lambda p, b: fps(p, b, ratio=0.0), r"ratio must be in \(0, 1\], got 0.0"),
        (lambda p, b: fps(p, b, num=0), "num must be an integer >= 1, got 0"),
        (lambda p, b: fps(p, torch.tensor([0, 0, 1, 1, 1, 0, 2, 2, 2, 2])), "batch must be sorted"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    pos, batch = ragged([4, 6], seed=15)
    with pytest.raises(ValueError, match=message):
        call(pos, batch)


# ----------------------------------------------------------------------------- against torch-cluster


@needs_torch_cluster
@pytest.mark.parametrize("k", [1, 7, 16])
def test_knn_torch_equals_torch_cluster(k, block_budget):
    x, batch_x = ragged(SIZES, seed=20)
    y, batch_y = ragged([3, 0, 7, 2, 1, 25, 0, 4, 9], seed=21)
    fallback = knn(x, y, k, batch_x, batch_y, backend="torch")
    compiled = knn(x, y, k, batch_x, batch_y, backend="torch_cluster")
    assert pairs_of(fallback) == pairs_of(compiled)


@needs_torch_cluster
@pytest.mark.parametrize("loop", [False, True])
def test_knn_graph_torch_equals_torch_cluster(loop, monkeypatch):
    monkeypatch.setitem(cluster._BLOCK_ELEMENTS, "cpu", 100_000)  # the 2000-point event is split
    pos, batch = ragged(SIZES + [2000], seed=22)
    fallback = knn_graph(pos, 16, batch, loop=loop, backend="torch")
    compiled = knn_graph(pos, 16, batch, loop=loop, backend="torch_cluster")
    assert pairs_of(fallback) == pairs_of(compiled)


@needs_torch_cluster
@pytest.mark.parametrize("amount", [{"ratio": 0.1}, {"ratio": 0.5}, {"ratio": 1.0}, {"num": 9}])
def test_fps_torch_equals_torch_cluster(amount):
    pos, batch = ragged(SIZES + [1500], seed=23)
    fallback = fps(pos, batch, **amount, backend="torch")
    compiled = fps(pos, batch, **amount, backend="torch_cluster")
    assert fallback.tolist() == compiled.tolist()


@needs_torch_cluster
def test_fps_random_start_same_on_both_backends():
    pos, batch = ragged(SIZES, seed=24)
    picks = {
        backend: fps(pos, batch, num=6, random_start=True, generator=torch.Generator().manual_seed(7), backend=backend)
        for backend in ("torch", "torch_cluster")
    }
    assert torch.equal(picks["torch"], picks["torch_cluster"])


@pytest.mark.parametrize("backend", ["torch", pytest.param("torch_cluster", marks=needs_torch_cluster)])
def test_knn_graph_with_duplicated_points_gives_k_neighbours_and_no_self_loop(backend):
    # Eight copies of one point: a point's own entry may not be among its k + 1 nearest.
    pos = torch.cat([torch.full((8, 3), 5.0), torch.rand(20, 3)])
    batch = torch.zeros(28, dtype=torch.long)
    edge_index = knn_graph(pos, 3, batch, backend=backend)
    assert bool((edge_index[0] != edge_index[1]).all())
    assert torch.bincount(edge_index[1], minlength=28).tolist() == [3] * 28
    copies_neighbours = edge_index[0][edge_index[1] < 8]
    assert bool((copies_neighbours < 8).all())  # a copy's nearest are the other copies


def test_knn_ties_on_a_grid_do_not_depend_on_the_batch():
    """On a cell grid many neighbours are equidistant: ties go to the smaller index, so an
    event's neighbours are the same alone or batched beside a larger event (other padding)."""
    axis = torch.arange(4, dtype=torch.float32)
    grid = torch.cartesian_prod(axis, axis, axis)  # 64 points, many ties
    other = torch.rand(300, 3) * 4
    alone = knn_graph(grid, 6, backend="torch")
    batched = knn_graph(torch.cat([grid, other]), 6, torch.tensor([0] * 64 + [1] * 300), backend="torch")
    in_grid = batched[1] < 64
    assert torch.equal(alone, batched[:, in_grid])
    # within a query's list: nearest first, equal distances by increasing index
    centre, neighbour = alone[1].view(64, 6), alone[0].view(64, 6)
    d = (grid[neighbour] - grid[centre]).square().sum(-1)
    key = d * 1000 + neighbour  # distances are integers here
    assert torch.equal(key, key.sort(dim=1).values)


@needs_torch_cluster
def test_backends_on_detector_cells_agree_on_distances_and_centres_not_on_tie_choices():
    """What is the same on real cell positions (module docstring): FPS centres exactly, and each
    query's k neighbour distances up to float32 rounding; which of several equidistant (or
    float32-equal) cells is taken may differ, so the two backends' model outputs differ."""
    from torch_geometric.data import Batch

    from pcfm.engine.data import pretraining_item, simulate_pretraining_events

    events = simulate_pretraining_events(["calochallenge-ds2", "lartpc-768"], 3, seed=1, lartpc_points=(300, 800))
    batch = Batch.from_data_list([pretraining_item(events[i], i) for i in range(len(events))])
    pos = batch.pos
    assert fps(pos, batch.batch, ratio=0.25, backend="torch").tolist() == \
        fps(pos, batch.batch, ratio=0.25, backend="torch_cluster").tolist()
    k = 16
    distances = {}
    for backend in ("torch", "torch_cluster"):
        query, neighbour = knn(pos, pos, k, batch.batch, batch.batch, backend=backend)
        assert torch.equal(torch.stack([query, neighbour]), knn(pos, pos, k, batch.batch, batch.batch, backend=backend))
        assert torch.bincount(query, minlength=len(pos)).tolist() == [k] * len(pos)
        d = (pos.double()[query] - pos.double()[neighbour]).norm(dim=1)
        order = np.lexsort((d.numpy(), query.numpy()))
        distances[backend] = d[order].view(len(pos), k)
    torch.testing.assert_close(distances["torch"], distances["torch_cluster"], rtol=1e-6, atol=1e-9)

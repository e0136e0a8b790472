"""k-nearest neighbours and farthest-point sampling on ragged batches of point clouds.

A batch is PyG-style: the points of all events stacked in one ``[N, D]`` tensor plus a sorted
``batch`` vector giving each point's event. Neighbours and centres never cross events.

Two backends compute the same thing up to ties:

* ``"torch_cluster"``: the compiled torch-cluster extension (fast on CPU thanks to its k-d tree).
  We call it directly because torch-geometric 2.8 routes ``knn_graph``/``fps`` to pyg-lib, which
  is not installable from the package index.
* ``"torch"``: pure torch, for machines without torch-cluster (our GPU machines have none).
  kNN is brute force over (block of queries, their own event) pairs, so memory stays bounded by
  ``_BLOCK_ELEMENTS`` distances whatever the event sizes; FPS runs one loop over the centre
  index with every event of the batch updated at once in a padded ``[events, points]`` array.

``backend="auto"`` (the default) uses torch-cluster when it is importable (and, for CUDA
tensors, built with CUDA), the torch fallback otherwise.

What agrees between them: FPS exactly; kNN exactly for points in general position. On cell
grids many neighbours are equidistant: the torch path takes the smaller index (float64
distances), torch-cluster's k-d tree takes whichever it meets first and compares in float32, so
the neighbour sets can differ among tied (or float32-equal) cells, and so do model outputs.
Each backend is deterministic; a model pins one through ``cluster_backend``.

Why one module of this length: kNN and FPS share the backend choice and the batch checks; each
op is its public function, its pure-torch version and its torch-cluster call.
"""
from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Iterator, Optional

import torch
from torch import Tensor

BACKENDS = ("auto", "torch_cluster", "torch")

#: Most padded query-point distances (float64) the torch kNN holds at once, per device type:
#: 64 MiB on CPU; 1 GiB on GPU, where bigger blocks mean fewer kernel launches.
_BLOCK_ELEMENTS = {"cpu": 2**23, "cuda": 2**27}


# ----------------------------------------------------------------------------- public API


def knn(
    x: Tensor,
    y: Tensor,
    k: int,
    batch_x: Optional[Tensor] = None,
    batch_y: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """For each point of ``y``, its ``k`` nearest points of ``x`` in the same event.

    Returns a ``LongTensor[2, E]``: row 0 indexes ``y``, row 1 indexes ``x`` (torch-cluster
    convention). A query whose event has fewer than ``k`` points in ``x`` gets all of them.
    The torch backend lists each query's neighbours nearest first, queries in ascending order.
    """
    _check_k(k)
    x, y = _check_points(x, "x"), _check_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have as many coordinates, got {x.shape[1]} and {y.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    if (batch_x is None) != (batch_y is None):
        raise ValueError("give both batch_x and batch_y, or neither (one event)")
    _check_batch(batch_x, x, "batch_x")
    _check_batch(batch_y, y, "batch_y")
    chosen = _resolve_backend(backend, x.device)
    if x.shape[0] == 0 or y.shape[0] == 0:
        return torch.empty(2, 0, dtype=torch.long, device=x.device)

    if chosen == "torch_cluster":
        return _torch_cluster().knn(x, y, k, batch_x, batch_y)
    num_events = _num_events(batch_x, batch_y)
    ptr_x, ptr_y = _pointers(batch_x, num_events, x), _pointers(batch_y, num_events, y)
    return _knn_torch(x, y, k, ptr_x, ptr_y, exclude_self=False)


def knn_graph(
    pos: Tensor,
    k: int,
    batch: Optional[Tensor] = None,
    *,
    loop: bool = False,
    flow: str = "source_to_target",
    backend: str = "auto",
) -> Tensor:
    """Edges from every point to its ``k`` nearest points of the same event.

    Returns ``edge_index [2, E]`` in PyG convention: with ``flow="source_to_target"``,
    ``edge_index[1]`` is the centre (destination) and ``edge_index[0]`` one of its neighbours;
    ``"target_to_source"`` swaps the rows. Without ``loop`` a point is never its own neighbour
    and still gets ``k`` neighbours (fewer only when its event has at most ``k`` points).
    """
    _check_k(k)
    if flow not in ("source_to_target", "target_to_source"):
        raise ValueError(f"flow must be 'source_to_target' or 'target_to_source', got {flow!r}")
    pos = _check_points(pos, "pos")
    _check_batch(batch, pos, "batch")
    chosen = _resolve_backend(backend, pos.device)
    if pos.shape[0] == 0:
        return torch.empty(2, 0, dtype=torch.long, device=pos.device)

    if chosen == "torch_cluster":
        centre, neighbour = _torch_cluster().knn(pos, pos, k if loop else k + 1, batch, batch)
        if not loop:
            not_self = centre != neighbour
            centre, neighbour = centre[not_self], neighbour[not_self]
            # A duplicated point can push a point's own entry out of its k + 1 nearest.
            keep = _rank_within_runs(centre) < k
            centre, neighbour = centre[keep], neighbour[keep]
    else:
        ptr = _pointers(batch, _num_events(batch, None), pos)
        centre, neighbour = _knn_torch(pos, pos, k, ptr, ptr, exclude_self=not loop)

    if flow == "source_to_target":
        return torch.stack([neighbour, centre])
    return torch.stack([centre, neighbour])


def fps(
    pos: Tensor,
    batch: Optional[Tensor] = None,
    *,
    ratio: Optional[float] = None,
    num: Optional[int] = None,
    random_start: bool = False,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> Tensor:
    """Farthest-point sampling per event: indices into ``pos`` of the chosen centres.

    Give exactly one of ``ratio`` (each event of ``n`` points gets ``ceil(ratio * n)`` centres,
    computed in float32 as torch-cluster does) or ``num`` (``min(num, n)``
    centres per event). Centres are listed event by event, in the order FPS picked them.
    Each event starts from its first point unless ``random_start``; the random start is drawn
    from ``generator``, so both backends make the same choice for the same generator state.
    ``backend="auto"`` uses the torch path (faster than torch-cluster's, see the comment below).
    """
    pos = _check_points(pos, "pos")
    _check_batch(batch, pos, "batch")
    if (ratio is None) == (num is None):
        raise ValueError("give exactly one of ratio and num")
    if ratio is not None and not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    # "auto" runs the torch path: it updates all events of the batch at once and was 3-4x
    # faster than torch-cluster's per-event loop on CPU (benchmarks/RESULTS.md).
    chosen = _resolve_backend("torch" if backend == "auto" else backend, pos.device)
    if pos.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=pos.device)

    ptr = _pointers(batch, _num_events(batch, None), pos)
    sizes = ptr[1:] - ptr[:-1]
    if ratio is not None:  # in float32 as torch-cluster, where ceil(0.3 * 50) is 16, not 15
        counts = (sizes.float() * torch.tensor(float(ratio))).ceil().long()
    else:
        counts = sizes.clamp(max=num)

    # A random start is a rotation of each event that brings the start point first; the
    # deterministic FPS then runs on the rotated points and its picks are rotated back.
    rotation = None
    if random_start:
        fraction = torch.rand(len(sizes), generator=generator, device=_generator_device(generator))
        start = (fraction.to(pos.device, torch.float64) * sizes).long()
        event_first, event_size, event_start = (v.repeat_interleave(sizes) for v in (ptr[:-1], sizes, start))
        local = torch.arange(pos.shape[0], device=pos.device) - event_first
        rotation = event_first + (local + event_start) % event_size
        pos = pos[rotation]

    if chosen == "torch_cluster":
        picks = _fps_torch_cluster(pos, ptr, counts, ratio)
    else:
        picks = _fps_torch(pos, ptr, counts)
    return picks if rotation is None else rotation[picks]


# ----------------------------------------------------------------------------- backends


@functools.lru_cache(maxsize=None)
def _load_torch_cluster() -> tuple[Optional[ModuleType], str]:
    """(module, "") when torch-cluster imports, else (None, why not)."""
    try:
        import torch_cluster
    except (ImportError, OSError) as error:  # OSError: a build against another torch
        return None, f"{type(error).__name__}: {error}"
    return torch_cluster, ""


def torch_cluster_available() -> bool:
    """Whether the compiled torch-cluster extension imports here (the ``"torch_cluster"`` backend)."""
    return _load_torch_cluster()[0] is not None


def _torch_cluster() -> ModuleType:
    module, _ = _load_torch_cluster()
    assert module is not None
    return module


def _torch_cluster_has_cuda() -> bool:
    try:
        return int(torch.ops.torch_cluster.cuda_version()) != -1
    except (AttributeError, RuntimeError):
        return False


def _resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run: "torch_cluster" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    module, why = _load_torch_cluster()
    if backend == "torch_cluster":
        if module is None:
            raise ImportError(
                f"backend='torch_cluster' was asked for but torch_cluster cannot be imported ({why}); "
                "install it with `pip install --no-build-isolation torch-cluster` or use backend='torch'"
            )
        return "torch_cluster"
    if module is None or (device.type == "cuda" and not _torch_cluster_has_cuda()):
        return "torch"
    return "torch_cluster"


def _knn_torch(x: Tensor, y: Tensor, k: int, ptr_x: Tensor, ptr_y: Tensor, *, exclude_self: bool) -> Tensor:
    """Brute-force kNN over blocks of (queries of some events, all points of those events).

    Squared distances come from one batched matmul of augmented coordinates,
    ``[y, |y|^2, 1] . [-2x, 1, |x|^2] = |y - x|^2``, done in float64 so that cancellation
    (and TF32 matmuls on GPU) cannot reorder close neighbours. With ``exclude_self`` (x is y)
    a query never picks its own point.
    """
    device = x.device
    x64, y64 = x.double(), y.double()
    y_aug = torch.cat([y64, y64.square().sum(1, keepdim=True), torch.ones_like(y64[:, :1])], 1)
    x_aug = torch.cat([-2 * x64, torch.ones_like(x64[:, :1]), x64.square().sum(1, keepdim=True)], 1)
    start_x, start_y = ptr_x[:-1].tolist(), ptr_y[:-1].tolist()
    size_x, size_y = (ptr_x[1:] - ptr_x[:-1]).tolist(), (ptr_y[1:] - ptr_y[:-1]).tolist()

    budget = _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS["cpu"])
    rows, cols = [], []
    for first, end, query_start, query_count in _plan_blocks(size_x, size_y, budget):
        width = max(size_x[first:end])
        n_x = torch.tensor(size_x[first:end], device=device)
        n_y = torch.tensor(size_y[first:end], device=device)
        x_slot = torch.arange(width, device=device)
        y_slot = torch.arange(query_start, query_start + query_count, device=device)
        x_valid = x_slot < n_x[:, None]  # [G, width]
        y_valid = y_slot < n_y[:, None]  # [G, queries]
        x_index = torch.tensor(start_x[first:end], device=device)[:, None] + x_slot
        y_index = torch.tensor(start_y[first:end], device=device)[:, None] + y_slot
        x_index = torch.where(x_valid, x_index, 0)
        y_index = torch.where(y_valid, y_index, 0)

        dist = torch.bmm(y_aug[y_index], x_aug[x_index].transpose(1, 2))  # [G, queries, width]
        dist.masked_fill_(~x_valid[:, None, :], math.inf)
        if exclude_self:
            own = y_slot.clamp(max=width - 1).view(1, -1, 1).expand(len(dist), -1, 1)
            dist.scatter_(2, own, math.inf)
        nearest = _k_smallest_stable(dist, min(k, width), x_slot)  # [G, queries, k]
        # nearest first, equal distances in index order (stable sort of exact distances)
        candidates = x64[x_index].gather(1, nearest.flatten(1)[..., None].expand(-1, -1, x.shape[1]))
        exact = (candidates.view(*nearest.shape, -1) - y64[y_index][:, :, None, :]).square().sum(-1)
        nearest = nearest.gather(2, exact.sort(dim=2, stable=True).indices)

        keep = y_valid[:, :, None] & x_valid.gather(1, nearest.flatten(1)).view_as(nearest)
        if exclude_self:
            keep &= nearest != y_slot[None, :, None]
        rows.append(y_index[:, :, None].expand_as(nearest)[keep])
        cols.append(x_index.gather(1, nearest.flatten(1)).view_as(nearest)[keep])
    if not rows:
        return torch.empty(2, 0, dtype=torch.long, device=device)
    return torch.stack([torch.cat(rows), torch.cat(cols)])


def _k_smallest_stable(dist: Tensor, k: int, slot: Tensor) -> Tensor:
    """Indices (in increasing order) of the ``k`` smallest entries of each row of ``dist``.

    ``dist`` is overwritten.
    Ties are broken by the smaller index, as torch-cluster does. ``topk`` alone would pick tied
    points (everywhere on cell grids) in an order that depends on the padded width of the work
    block, so an event's neighbours would change with the events batched beside it. A sort
    would be stable but ~18x slower than the two ``topk`` calls used here.
    """
    kth = dist.topk(k, dim=2, largest=False).values[..., -1:]  # k-th smallest distance per row
    tied = dist == kth
    dist.masked_fill_(dist < kth, -1.0)  # strictly nearer: always in
    dist.masked_fill_(~tied & (dist != -1.0), math.inf)
    slot_key = slot.to(dist.dtype).expand_as(dist)
    dist[tied] = slot_key[tied]  # the tied points compete by index
    return dist.topk(k, dim=2, largest=False).indices.sort(dim=2).values  # in index order


def _plan_blocks(size_x: list[int], size_y: list[int], budget: int) -> Iterator[tuple[int, int, int, int]]:
    """Split a batch into work blocks of at most ``budget`` padded distances.

    Yields ``(first_event, end_event, query_start, query_count)``: the queries
    ``query_start .. query_start + query_count`` of events ``first_event .. end_event - 1``
    against all points of those events. Small events are grouped, padded to the largest of the
    group; an event too large for one block is alone and its queries are split.
    """
    num_events, event = len(size_x), 0
    while event < num_events:
        if size_x[event] == 0 or size_y[event] == 0:
            event += 1
            continue
        if size_x[event] * size_y[event] > budget:
            step = max(1, budget // size_x[event])
            for query_start in range(0, size_y[event], step):
                yield event, event + 1, query_start, min(step, size_y[event] - query_start)
            event += 1
            continue
        end, width, height = event + 1, size_x[event], size_y[event]
        while end < num_events:
            new_width, new_height = max(width, size_x[end]), max(height, size_y[end])
            if (end + 1 - event) * new_width * new_height > budget:
                break
            end, width, height = end + 1, new_width, new_height
        yield event, end, 0, height
        event = end


def _fps_torch(pos: Tensor, ptr: Tensor, counts: Tensor) -> Tensor:
    """FPS starting at each event's first point, all events advanced together.

    Events are padded into ``[events, largest event]`` rows sorted by centre count, so step
    ``i`` only touches the leading rows of events that still need centres. Distances and ties
    (first index wins) follow torch-cluster exactly.
    """
    sizes = ptr[1:] - ptr[:-1]
    order = torch.argsort(counts, descending=True, stable=True)
    order = order[counts[order] > 0]
    if len(order) == 0:
        return torch.empty(0, dtype=torch.long, device=pos.device)
    row_counts = counts[order].tolist()
    row_sizes, row_starts = sizes[order], ptr[:-1][order]
    width = int(row_sizes.max())

    slot = torch.arange(width, device=pos.device)
    valid = slot < row_sizes[:, None]
    # One [rows, width] plane per coordinate: reductions over a last axis of size 3 are slow.
    planes = pos[torch.where(valid, row_starts[:, None] + slot, 0)].permute(2, 0, 1).contiguous()
    rows = torch.arange(len(order), device=pos.device)

    picks = torch.zeros(len(order), row_counts[0], dtype=torch.long, device=pos.device)
    dist = _squared_distance_to(planes, planes[:, :, 0]).masked_fill_(~valid, -1.0)  # padding never wins
    active = len(order)
    for step in range(1, row_counts[0]):
        while row_counts[active - 1] <= step:
            active -= 1
        farthest = dist[:active].argmax(1)
        picks[:active, step] = farthest
        new_dist = _squared_distance_to(planes[:, :active], planes[:, rows[:active], farthest])
        torch.minimum(dist[:active], new_dist, out=dist[:active])

    taken = torch.arange(row_counts[0], device=pos.device) < counts[order][:, None]
    global_picks = picks + row_starts[:, None]
    back = torch.argsort(order)  # rows back into event order
    return global_picks[back][taken[back]]


def _squared_distance_to(planes: Tensor, centre: Tensor) -> Tensor:
    """``sum_d (planes[d] - centre[d])^2`` for planes ``[D, rows, width]`` and centres ``[D, rows]``.

    Accumulated coordinate by coordinate, the order torch-cluster sums in, so ties break alike.
    """
    dist = (planes[0] - centre[0][:, None]).square_()
    for plane, coordinate in zip(planes[1:], centre[1:]):
        dist += (plane - coordinate[:, None]).square_()
    return dist


def _fps_torch_cluster(pos: Tensor, ptr: Tensor, counts: Tensor, ratio: Optional[float]) -> Tensor:
    """torch-cluster FPS from each event's first point (it cannot take empty events or ``num``).

    Empty events are dropped from the batch vector. For a fixed number of centres each event
    gets its own ratio ``num / n`` (at least ``num`` centres after ceil) and the surplus is cut:
    FPS picks do not depend on how many follow.
    """
    sizes = ptr[1:] - ptr[:-1]
    nonempty = sizes > 0
    compact_batch = torch.arange(int(nonempty.sum()), device=pos.device).repeat_interleave(sizes[nonempty])
    if ratio is not None:
        return _torch_cluster().fps(pos, compact_batch, float(ratio), False)
    event_ratio = (counts[nonempty].to(torch.float64) / sizes[nonempty]).to(pos.dtype)
    picks = _torch_cluster().fps(pos, compact_batch, event_ratio, False)
    picked_event = compact_batch[picks]
    return picks[_rank_within_runs(picked_event) < counts[nonempty][picked_event]]


# ----------------------------------------------------------------------------- helpers


def _rank_within_runs(values: Tensor) -> Tensor:
    """Position of each entry in its run of equal consecutive values: [5, 5, 7, 7, 7] -> [0, 1, 0, 1, 2]."""
    if len(values) == 0:
        return values.new_zeros(0)
    run_start = torch.ones_like(values, dtype=torch.bool)
    run_start[1:] = values[1:] != values[:-1]
    position = torch.arange(len(values), device=values.device)
    return position - torch.cummax(torch.where(run_start, position, 0), 0).values


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _check_points(points: Tensor, name: str) -> Tensor:
    if not isinstance(points, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(points).__name__}")
    if points.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {points.dtype}")
    return points.contiguous()


def _check_batch(batch: Optional[Tensor], points: Tensor, name: str) -> None:
    if batch is None:
        return
    if not isinstance(batch, Tensor) or batch.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of event indices")
    if batch.dtype != torch.long:
        raise ValueError(f"{name} must be an int64 tensor, got {batch.dtype}")
    if len(batch) != len(points):
        raise ValueError(f"{name} has {len(batch)} entries for {len(points)} points")
    if batch.device != points.device:
        raise ValueError(f"{name} is on {batch.device} but the points are on {points.device}")
    if len(batch) > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError(f"{name} must be sorted (points grouped by event, events in increasing order)")
    if len(batch) and int(batch[0]) < 0:
        raise ValueError(f"{name} has negative event indices")


def _num_events(batch_a: Optional[Tensor], batch_b: Optional[Tensor]) -> int:
    last = [int(b[-1]) for b in (batch_a, batch_b) if b is not None and len(b)]
    return max(last, default=0) + 1


def _pointers(batch: Optional[Tensor], num_events: int, points: Tensor) -> Tensor:
    """CSR offsets: the points of event ``b`` are ``ptr[b]:ptr[b + 1]``."""
    if batch is None:
        return torch.tensor([0, len(points)], device=points.device)
    return torch.searchsorted(batch, torch.arange(num_events + 1, device=batch.device))


def _generator_device(generator: Optional[torch.Generator]) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device

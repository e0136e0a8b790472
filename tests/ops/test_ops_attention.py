"""Attention ops: the pure-torch references against naive dense maths, gradients, input
checks and backend dispatch. Runs without triton and without a GPU."""
import math
import subprocess
import sys

import pytest
import torch

from pcfm.ops import attention
from pcfm.ops.attention import edge_attention, resolve_backend, varlen_attention

# Empty events first, in the middle and last; one-point events; sizes from 1 to 70.
RAGGED_SIZES = [0, 1, 3, 70, 0, 1, 2, 9, 0]


def ragged(sizes, heads=2, head_dim=5, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    q, k, v = (torch.randn(n, heads, head_dim, generator=generator, dtype=dtype) for _ in range(3))
    ptr = torch.tensor([0] + sizes).cumsum(0)
    pos = 30.0 * torch.randn(n, 3, generator=generator, dtype=dtype)
    slope = torch.rand(heads, generator=generator, dtype=dtype) / 10
    return q, k, v, ptr, pos, slope


def dense_per_event(q, k, v, ptr, pos=None, slope=None):
    """Naive float64 attention: one full softmax matrix per event and head."""
    out = torch.zeros_like(q, dtype=torch.float64)
    scale = 1 / math.sqrt(q.shape[-1])
    for start, end in zip(ptr[:-1].tolist(), ptr[1:].tolist()):
        for h in range(q.shape[1]):
            logits = scale * q[start:end, h].double() @ k[start:end, h].double().T
            if slope is not None:
                logits = logits - slope[h].double() * torch.cdist(pos[start:end].double(), pos[start:end].double(),
                                                        compute_mode="donot_use_mm_for_euclid_dist")
            out[start:end, h] = logits.softmax(-1) @ v[start:end, h].double()
    return out


def random_graph(num_src, num_dst, num_edges, seed=0):
    """Edges with duplicates, self loops, a hub destination and destinations without edges."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_src, (num_edges,), generator=generator)
    dst = torch.randint(0, num_dst - 3, (num_edges,), generator=generator)  # last 3: no edges
    dst[: num_edges // 3] = 1  # a hub with many incoming edges
    src[-4:], dst[-4:] = 2, 2  # duplicated self loop
    return torch.stack([src, dst])


def dense_per_node(q, k, v, edge_index, edge_bias=None):
    """Naive float64 edge attention: one softmax per destination node over its edges."""
    out = torch.zeros_like(q, dtype=torch.float64)
    scale = 1 / math.sqrt(q.shape[-1])
    for node in range(q.shape[0]):
        into = (edge_index[1] == node).nonzero()[:, 0]
        if into.numel() == 0:
            continue
        src = edge_index[0, into]
        logits = scale * (q[node].double()[None] * k[src].double()).sum(-1)
        if edge_bias is not None:
            logits = logits + edge_bias[into].double()
        out[node] = (logits.softmax(0)[..., None] * v[src].double()).sum(0)
    return out


# ----------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("with_bias", [False, True])
def test_varlen_reference_matches_dense_per_event(with_bias):
    q, k, v, ptr, pos, slope = ragged(RAGGED_SIZES)
    bias = dict(pos=pos, distance_slope=slope) if with_bias else {}
    out = varlen_attention(q, k, v, ptr, **bias)
    expected = dense_per_event(q, k, v, ptr, **(dict(pos=pos, slope=slope) if with_bias else {}))
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # A one-point event attends only to itself.
    one = int(ptr[1])
    torch.testing.assert_close(out[one], v[one], rtol=1e-12, atol=1e-12)


def test_varlen_query_chunks_give_the_same_values_and_gradients(monkeypatch):
    q, k, v, ptr, pos, slope = ragged(RAGGED_SIZES)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, slope)]
    whole = varlen_attention(*inputs[:3], ptr, pos=pos, distance_slope=inputs[3])
    whole_grads = torch.autograd.grad(whole.square().sum(), inputs)
    monkeypatch.setattr(attention, "_REFERENCE_BLOCK_ELEMENTS", 50)  # 70-point event: 1 query per chunk
    chunked = varlen_attention(*inputs[:3], ptr, pos=pos, distance_slope=inputs[3])
    chunked_grads = torch.autograd.grad(chunked.square().sum(), inputs)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_distance_bias_geometry():
    q, k, v, ptr, pos, slope = ragged([6, 40])
    no_bias = varlen_attention(q, k, v, ptr)
    zero_slope = varlen_attention(q, k, v, ptr, pos=pos, distance_slope=torch.zeros_like(slope))
    torch.testing.assert_close(zero_slope, no_bias, rtol=1e-12, atol=1e-12)
    # The bias depends on distances only: moving a whole event changes nothing.
    moved = pos.clone()
    moved[6:] += torch.tensor([1000.0, -250.0, 3.0], dtype=pos.dtype)
    torch.testing.assert_close(varlen_attention(q, k, v, ptr, pos=moved, distance_slope=slope),
                               varlen_attention(q, k, v, ptr, pos=pos, distance_slope=slope),
                               rtol=1e-9, atol=1e-12)
    # A steep slope makes every point attend to itself (its only neighbour at distance 0).
    local = varlen_attention(q, k, v, ptr, pos=pos, distance_slope=torch.full_like(slope, 1e3))
    torch.testing.assert_close(local, v, rtol=1e-9, atol=1e-9)


def test_varlen_reference_gradcheck():
    q, k, v, ptr, pos, slope = ragged([0, 1, 3, 0, 2], heads=2, head_dim=3)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, slope)]

    def function(q, k, v, slope):
        return varlen_attention(q, k, v, ptr, pos=pos, distance_slope=slope, backend="reference")

    assert torch.autograd.gradcheck(function, inputs)


def test_varlen_pos_gets_no_gradient():
    q, k, v, ptr, pos, slope = ragged([3, 4])
    pos.requires_grad_()
    out = varlen_attention(q, k, v, ptr, pos=pos, distance_slope=slope.requires_grad_())
    out.sum().backward()
    assert pos.grad is None and slope.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_varlen_low_precision_keeps_dtype(dtype):
    q, k, v, ptr, pos, slope = ragged(RAGGED_SIZES, head_dim=8)
    expected = dense_per_event(q.to(dtype), k.to(dtype), v.to(dtype), ptr, pos=pos, slope=slope)
    out = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), ptr, pos=pos.float(),
                           distance_slope=slope.float())
    assert out.dtype == dtype
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_varlen_all_events_empty_is_differentiable():
    q, k, v, ptr, pos, slope = ragged([0, 0])
    q.requires_grad_()
    out = varlen_attention(q, k, v, ptr)
    assert out.shape == (0, 2, 5)
    out.sum().backward()
    assert q.grad.shape == (0, 2, 5)


def test_varlen_custom_scale():
    q, k, v, ptr, _, _ = ragged([4, 5])
    torch.testing.assert_close(varlen_attention(q, k, v, ptr, scale=0.7),
                               dense_per_event(q * 0.7 * math.sqrt(5), k, v, ptr), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ptr, message", [
    ([1, 3, 5], "ptr must start at 0, got 1"),
    ([0, 3, 4], "ptr must end at N = 5 (rows of q), got 4"),
    ([0, 3, 2, 5], "ptr must be non-decreasing, but event 1 has negative size -1"),
])
def test_varlen_rejects_bad_ptr(ptr, message):
    q, k, v, _, _, _ = ragged([5])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        varlen_attention(q, k, v, torch.tensor(ptr))


def test_varlen_rejects_inconsistent_inputs():
    q, k, v, ptr, pos, slope = ragged([5])
    with pytest.raises(ValueError, match="give both pos and distance_slope"):
        varlen_attention(q, k, v, ptr, pos=pos)
    with pytest.raises(ValueError, match=r"distance_slope must have shape \(2,\), got \(3,\)"):
        varlen_attention(q, k, v, ptr, pos=pos, distance_slope=torch.ones(3, dtype=q.dtype))
    with pytest.raises(ValueError, match="q, k and v must have the same shape"):
        varlen_attention(q, k[:4], v[:4], ptr)
    with pytest.raises(ValueError, match="q, k and v must have one dtype"):
        varlen_attention(q, k.float(), v, ptr)


# ----------------------------------------------------------------------------- edge


@pytest.mark.parametrize("with_bias", [False, True])
def test_edge_reference_matches_dense_per_node(with_bias):
    num_src, num_dst = 11, 13  # bipartite: sources and destinations differ
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(num_dst, 3, 4, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(num_src, 3, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    edge_index = random_graph(num_src, num_dst, 60)
    bias = torch.randn(60, 3, generator=generator, dtype=torch.float64) if with_bias else None
    out = edge_attention(q, k, v, edge_index, edge_bias=bias)
    torch.testing.assert_close(out, dense_per_node(q, k, v, edge_index, bias), rtol=1e-12, atol=1e-12)
    assert torch.all(out[-3:] == 0)  # destinations without incoming edges
    # The edge order is irrelevant.
    order = torch.randperm(60, generator=generator)
    shuffled = edge_attention(q, k, v, edge_index[:, order], edge_bias=None if bias is None else bias[order])
    torch.testing.assert_close(shuffled, out, rtol=1e-12, atol=1e-12)


def test_edge_reference_gradcheck():
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(6, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    edge_index = random_graph(6, 6, 14)
    bias = torch.randn(14, 2, generator=generator, dtype=torch.float64, requires_grad=True)

    def function(q, k, v, bias):
        return edge_attention(q, k, v, edge_index, edge_bias=bias, backend="reference")

    assert torch.autograd.gradcheck(function, (q, k, v, bias))


def test_edge_without_edges_gives_zeros_and_zero_gradients():
    q, k, v = (torch.randn(4, 2, 3, requires_grad=True) for _ in range(3))
    out = edge_attention(q, k, v, torch.empty(2, 0, dtype=torch.long), edge_bias=torch.empty(0, 2))
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0) and torch.all(k.grad == 0) and torch.all(v.grad == 0)


def test_edge_low_precision_keeps_dtype():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(9, 2, 8, generator=generator) for _ in range(3))
    edge_index = random_graph(9, 9, 30)
    out = edge_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), edge_index)
    assert out.dtype == torch.bfloat16
    expected = dense_per_node(q.bfloat16(), k.bfloat16(), v.bfloat16(), edge_index)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_edge_rejects_bad_input():
    q, k, v = (torch.randn(4, 2, 3) for _ in range(3))
    with pytest.raises(ValueError, match=r"edge_index destinations \(row 1\) must lie in \[0, 4\), but edge 1 has 4"):
        edge_attention(q, k, v, torch.tensor([[0, 1], [2, 4]]))
    with pytest.raises(ValueError, match=r"edge_index sources \(row 0\) must lie in \[0, 4\), but edge 0 has -1"):
        edge_attention(q, k, v, torch.tensor([[-1, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"edge_bias must have shape \(2, 2\), got \(2, 3\)"):
        edge_attention(q, k, v, torch.tensor([[0, 1], [2, 3]]), edge_bias=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_nodes=5 but q has 4 rows"):
        edge_attention(q, k, v, torch.tensor([[0, 1], [2, 3]]), num_nodes=5)
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\), got \(3, 2\)"):
        edge_attention(q, k, v, torch.zeros(3, 2, dtype=torch.long))


# ----------------------------------------------------------------------------- dispatch


def test_auto_runs_sdpa_and_the_edge_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(attention, "_triton_import_problem", lambda: None)  # even with triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("varlen", device="cpu", dtype=torch.float32, head_dim=64) == "sdpa"
    assert resolve_backend("edge", device="cpu", dtype=torch.float32, head_dim=64) == "reference"
    calls = []
    monkeypatch.setattr(attention, "varlen_attention_sdpa", lambda *a, **kw: calls.append(1))
    q, k, v, ptr, _, _ = ragged([3])
    varlen_attention(q, k, v, ptr)
    assert calls == [1]
    with pytest.raises(ValueError, match="backend='sdpa' cannot run here: it only implements varlen_attention"):
        resolve_backend("edge", backend="sdpa", device="cpu", dtype=torch.float32, head_dim=64)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bucket_elements", [2**24, 2 * 70 * 70, 100])
def test_sdpa_backend_matches_dense_per_event_values_and_gradients(with_bias, bucket_elements, monkeypatch):
    """Padded buckets (one per event, several events, or the reference for events too large)."""
    monkeypatch.setattr(attention, "_SDPA_BUCKET_ELEMENTS", bucket_elements)
    q, k, v, ptr, pos, slope = ragged(RAGGED_SIZES)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, slope)]
    bias = dict(pos=pos, distance_slope=inputs[3]) if with_bias else {}
    out = attention.varlen_attention_sdpa(*inputs[:3], ptr, **bias)
    expected = dense_per_event(*inputs[:3], ptr, pos, inputs[3]) if with_bias else dense_per_event(*inputs[:3], ptr)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(out)
    wanted = inputs if with_bias else inputs[:3]
    got = torch.autograd.grad((out * weights).sum(), wanted)
    reference = torch.autograd.grad((expected * weights).sum(), wanted)
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # float32 stays within float32 rounding of the float64 result
    low = attention.varlen_attention_sdpa(q.float(), k.float(), v.float(), ptr, pos=pos.float(),
                                          distance_slope=slope.float())
    relative = (low.double() - dense_per_event(q, k, v, ptr, pos, slope)).norm() / low.double().norm()
    assert low.dtype == torch.float32 and relative < 1e-5


def test_auto_choice_on_cuda(monkeypatch):
    """The decision table for CUDA inputs (only the choice; nothing runs on a GPU here)."""
    monkeypatch.setattr(attention, "_triton_import_problem", lambda: None)
    choose = lambda op, dtype, head_dim=64, has_bias=False: resolve_backend(  # noqa: E731
        op, device="cuda", dtype=dtype, head_dim=head_dim, has_bias=has_bias)
    has_varlen_attn = attention._torch_varlen_function() is not None
    assert choose("varlen", torch.bfloat16) == ("torch_varlen" if has_varlen_attn else "triton")
    assert choose("varlen", torch.bfloat16, has_bias=True) == "triton"
    assert choose("varlen", torch.float32) == "triton"
    assert choose("varlen", torch.float16, head_dim=12) == "triton"  # FlashAttention needs D % 8 == 0
    assert choose("edge", torch.bfloat16) == "triton"
    assert choose("edge", torch.float64) == "reference"
    monkeypatch.setattr(attention, "_triton_import_problem", lambda: "ModuleNotFoundError: no triton")
    assert choose("varlen", torch.float32) == "reference"
    assert choose("edge", torch.float16) == "reference"


def test_unavailable_backends_raise_with_the_reason(monkeypatch):
    cpu = dict(device="cpu", dtype=torch.float32, head_dim=64)
    monkeypatch.setattr(attention, "_triton_import_problem", lambda: "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(ImportError, match="backend='triton' was asked for but triton cannot be imported "
                                          r"\(ModuleNotFoundError: No module named 'triton'\)"):
        resolve_backend("edge", backend="triton", **cpu)
    monkeypatch.setattr(attention, "_triton_import_problem", lambda: None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' cannot run here: it needs CUDA tensors, got device cpu"):
        resolve_backend("varlen", backend="triton", **cpu)
    with pytest.raises(ValueError, match="the kernels take float16, bfloat16 or float32, got torch.float64"):
        resolve_backend("varlen", backend="triton", device="cuda", dtype=torch.float64, head_dim=64)
    with pytest.raises(ValueError, match="backend='torch_varlen' cannot run here: it only implements varlen_attention"):
        resolve_backend("edge", backend="torch_varlen", **cpu)
    with pytest.raises(ValueError, match="torch_varlen' cannot run here: it has no distance bias"):
        resolve_backend("varlen", backend="torch_varlen", has_bias=True, **cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("varlen", backend="flash", **cpu)
    q, k, v, ptr, _, _ = ragged([3], dtype=torch.float16)
    expected = "it needs CUDA tensors, got device cpu" if attention._torch_varlen_function() else "needs torch >= 2.10"
    with pytest.raises(ValueError, match=expected):
        varlen_attention(q, k, v, ptr, backend="torch_varlen")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch_varlen (FlashAttention) needs a CUDA device")
def test_torch_varlen_backend_matches_reference_on_gpu():
    if attention._torch_varlen_function() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    q, k, v, ptr, _, _ = ragged(RAGGED_SIZES, heads=2, head_dim=64, dtype=torch.float32)
    q, k, v = (t.cuda().bfloat16().requires_grad_() for t in (q, k, v))
    ptr = ptr.cuda()
    out = varlen_attention(q, k, v, ptr, backend="torch_varlen")
    reference = varlen_attention(q, k, v, ptr, backend="reference")
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    reference_grads = torch.autograd.grad(reference.float().square().sum(), (q, k, v))
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


def test_importing_pcfm_does_not_import_triton():
    code = ("import sys, torch; from pcfm.ops.attention import varlen_attention; "
            "q = torch.randn(3, 1, 4); varlen_attention(q, q, q, torch.tensor([0, 3])); "
            "print(sorted(m for m in ('triton', 'pcfm.kernels') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def counted_reference(q, k, v, ptr, *, pos, distance_slope, scale):
    """A registered toy backend: the reference, counting its calls."""
    counted_reference.calls += 1
    return attention.varlen_attention_reference(q, k, v, ptr, pos=pos, distance_slope=distance_slope, scale=scale)


counted_reference.calls = 0


def test_a_registered_backend_runs_when_named_and_auto_ignores_it_unless_listed(monkeypatch):
    monkeypatch.setitem(attention.ATTENTION_BACKENDS, "counted",
                        attention.AttentionBackend({"varlen": f"{__name__}:counted_reference"}))
    q, k, v, ptr, pos, slope = ragged([3, 5])
    out = varlen_attention(q, k, v, ptr, pos=pos, distance_slope=slope, backend="counted")
    torch.testing.assert_close(out, dense_per_event(q, k, v, ptr, pos, slope))
    assert counted_reference.calls == 1
    with pytest.raises(ValueError, match="backend='counted' cannot run here: it only implements varlen_attention"):
        resolve_backend("edge", backend="counted", device="cpu", dtype=torch.float64, head_dim=4)
    assert resolve_backend("varlen", device="cpu", dtype=torch.float64, head_dim=4) == "sdpa"
    monkeypatch.setitem(attention.AUTO_ORDER, "other", ("counted", "reference"))
    assert resolve_backend("varlen", device="cpu", dtype=torch.float64, head_dim=4) == "counted"
    assert resolve_backend("edge", device="cpu", dtype=torch.float64, head_dim=4) == "reference"

"""The fused Triton attention kernels against the pure-torch references: forward and every
gradient, ragged edge cases included.

Without a GPU they run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET when
``@triton.jit`` decorates a kernel, so tests/conftest.py sets it before anything imports triton.
Sizes are tiny (the interpreter runs each program in Python); tiles of 16 make events span
several tiles.
"""
import importlib.util
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and importlib.util.find_spec("triton") is not None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=0 was set by the user: without a GPU the kernels cannot run",
                    allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed, so the fused kernels cannot run")

from pcfm.kernels.edge_attention import EdgeConfig, edge_attention_triton  # noqa: E402
from pcfm.kernels.varlen_attention import VarlenConfig, tile_table, varlen_attention_triton  # noqa: E402
from pcfm.ops.attention import (edge_attention, edge_attention_reference, varlen_attention,  # noqa: E402
                                varlen_attention_reference)

DEVICE = "cuda" if ON_GPU else "cpu"
SMALL_TILES = VarlenConfig(16, 16, 16, 16, 16, 16)
MIXED_TILES = VarlenConfig(32, 16, 16, 32, 16, 32)  # query and key tiles differ per kernel
# Empty events first, in the middle and last; one-point events; a 37-point event over 3 tiles.
RAGGED_SIZES = [0, 1, 37, 5, 0, 1, 18, 0]


def assert_close_relative(got, want, bound, what):
    """max |got - want| <= bound * max |want| (plus a tiny floor for all-zero references)."""
    error = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    size = want.double().abs().max().item() if want.numel() else 0.0
    assert error <= bound * size + 1e-7, f"{what}: max error {error:.3g} vs max magnitude {size:.3g}"


def gradients(output, inputs, seed=0):
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(output.shape, generator=generator).to(output)
    return torch.autograd.grad(output, inputs, grad_out)


# ----------------------------------------------------------------------------- varlen


def ragged_inputs(sizes, heads, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    q, k, v = (torch.randn(n, heads, head_dim, generator=generator).to(DEVICE, dtype).requires_grad_()
               for _ in range(3))
    ptr = torch.tensor([0] + sizes).cumsum(0).to(DEVICE)
    pos = (20.0 * torch.randn(n, 3, generator=generator)).to(DEVICE)
    slope = (0.2 * torch.rand(heads, generator=generator)).to(DEVICE).requires_grad_()
    return q, k, v, ptr, pos, slope


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("head_dim, config", [(8, SMALL_TILES), (20, MIXED_TILES)])  # 16 and 32 lanes
def test_varlen_kernel_matches_reference_fp32(with_bias, head_dim, config):
    q, k, v, ptr, pos, slope = ragged_inputs(RAGGED_SIZES, heads=2, head_dim=head_dim, dtype=torch.float32)
    bias = dict(pos=pos, slope=slope) if with_bias else {}
    out = varlen_attention_triton(q, k, v, ptr, config=config, **bias)
    inputs = (q, k, v, slope) if with_bias else (q, k, v)
    grads = gradients(out, inputs)

    as64 = [t.detach().double().requires_grad_() for t in inputs]
    reference = varlen_attention_reference(
        *as64[:3], ptr, **(dict(pos=pos.double(), distance_slope=as64[3]) if with_bias else {}))
    reference_grads = gradients(reference, as64)
    assert out.dtype == torch.float32
    assert_close_relative(out, reference, 1e-5, "output")
    for name, got, want in zip("q k v slope".split(), grads, reference_grads):
        assert_close_relative(got, want, 1e-5, f"d{name}")


def test_varlen_kernel_fp16():
    q, k, v, ptr, pos, slope = ragged_inputs(RAGGED_SIZES, heads=2, head_dim=16, dtype=torch.float16)
    out = varlen_attention_triton(q, k, v, ptr, pos=pos, slope=slope, config=SMALL_TILES)
    grads = gradients(out, (q, k, v, slope))
    as32 = [t.detach().float().requires_grad_() for t in (q, k, v, slope)]
    reference = varlen_attention_reference(*as32[:3], ptr, pos=pos, distance_slope=as32[3])
    assert out.dtype == torch.float16 and grads[0].dtype == torch.float16
    assert_close_relative(out, reference, 3e-3, "output")
    for name, got, want in zip("q k v slope".split(), grads, gradients(reference, as32)):
        assert_close_relative(got, want, 1e-2, f"d{name}")


@pytest.mark.skipif(not ON_GPU, reason="Triton 3.9's interpreter multiplies the raw bits of bfloat16 "
                                       "tl.dot operands; bfloat16 varlen needs a GPU")
def test_varlen_kernel_bf16_on_gpu():
    q, k, v, ptr, pos, slope = ragged_inputs(RAGGED_SIZES, heads=2, head_dim=64, dtype=torch.bfloat16)
    out = varlen_attention_triton(q, k, v, ptr, pos=pos, slope=slope)
    grads = gradients(out, (q, k, v, slope))
    as32 = [t.detach().float().requires_grad_() for t in (q, k, v, slope)]
    reference = varlen_attention_reference(*as32[:3], ptr, pos=pos, distance_slope=as32[3])
    assert_close_relative(out, reference, 2e-2, "output")
    for name, got, want in zip("q k v slope".split(), grads, gradients(reference, as32)):
        assert_close_relative(got, want, 5e-2, f"d{name}")


def test_varlen_kernel_through_public_api_with_default_tiles():
    q, k, v, ptr, pos, slope = ragged_inputs([70, 0, 3], heads=1, head_dim=16, dtype=torch.float32)
    out = varlen_attention(q, k, v, ptr, pos=pos, distance_slope=slope, backend="triton")
    reference = varlen_attention(q, k, v, ptr, pos=pos, distance_slope=slope, backend="reference")
    assert_close_relative(out, reference, 1e-5, "output")
    for name, got, want in zip("q k v slope".split(), gradients(out, (q, k, v, slope)),
                               gradients(reference, (q, k, v, slope))):
        assert_close_relative(got, want, 1e-5, f"d{name}")


def test_varlen_kernel_all_events_empty():
    q, k, v, ptr, pos, slope = ragged_inputs([0, 0], heads=2, head_dim=8, dtype=torch.float32)
    out = varlen_attention_triton(q, k, v, ptr, pos=pos, slope=slope, config=SMALL_TILES)
    assert out.shape == (0, 2, 8)
    dq, dslope = torch.autograd.grad(out.sum(), (q, slope))
    assert dq.shape == (0, 2, 8) and torch.all(dslope == 0)


def test_tile_table_covers_every_point_once_within_its_event():
    sizes = [0, 1, 37, 5, 0, 16, 17]
    ptr = torch.tensor([0] + sizes).cumsum(0)
    table = tile_table(ptr, 16, int(ptr[-1]))
    assert table.shape == (int(ptr[-1]) // 16 + len(sizes), 3)
    real = table[:, 2] > table[:, 1]
    assert torch.all(table[~real] == 0)
    covered = torch.cat([torch.arange(first, min(first + 16, end)) for first, _, end in table[real].tolist()])
    assert torch.equal(covered.sort().values, torch.arange(int(ptr[-1])))
    events = torch.searchsorted(ptr, table[real, 0], right=True) - 1
    assert torch.equal(table[real, 1], ptr[events]) and torch.equal(table[real, 2], ptr[events + 1])
    lengths = table[:, 2] - table[:, 1]
    assert torch.all(lengths[:-1] >= lengths[1:])  # longest events first


# ----------------------------------------------------------------------------- edge


def graph_inputs(num_src, num_dst, num_edges, heads, head_dim, dtype, seed=0):
    """A bipartite graph with a hub destination (many edge blocks), destinations without
    incoming edges, sources without outgoing edges, duplicate edges and a self loop."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_src - 2, (num_edges,), generator=generator)  # last 2 sources: unused
    dst = torch.randint(0, num_dst - 3, (num_edges,), generator=generator)  # last 3 destinations: no edges
    dst[: num_edges // 2] = 1
    src[-3:], dst[-3:] = 2, 2
    edge_index = torch.stack([src, dst]).to(DEVICE)
    q = torch.randn(num_dst, heads, head_dim, generator=generator).to(DEVICE, dtype).requires_grad_()
    k, v = (torch.randn(num_src, heads, head_dim, generator=generator).to(DEVICE, dtype).requires_grad_()
            for _ in range(2))
    bias = torch.randn(num_edges, heads, generator=generator).to(DEVICE).requires_grad_()
    return q, k, v, edge_index, bias


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("config", [EdgeConfig(block_e=16), EdgeConfig(block_e=8, block_h=2)])
def test_edge_kernel_matches_reference_fp32(with_bias, config):
    # 3 heads of 6: padded lanes; block_h=2 splits the heads over two programs.
    q, k, v, edge_index, bias = graph_inputs(12, 15, 70, heads=3, head_dim=6, dtype=torch.float32)
    out = edge_attention_triton(q, k, v, edge_index, edge_bias=bias if with_bias else None, config=config)
    inputs = (q, k, v, bias) if with_bias else (q, k, v)
    grads = gradients(out, inputs)
    as64 = [t.detach().double().requires_grad_() for t in inputs]
    reference = edge_attention_reference(*as64[:3], edge_index, edge_bias=as64[3] if with_bias else None)
    assert torch.all(out[-3:] == 0)
    assert_close_relative(out, reference, 1e-5, "output")
    for name, got, want in zip("q k v bias".split(), grads, gradients(reference, as64)):
        assert_close_relative(got, want, 1e-5, f"d{name}")
    assert torch.all(grads[1][-2:] == 0) and torch.all(grads[2][-2:] == 0)  # sources without out-edges


def test_edge_kernel_bf16():
    q, k, v, edge_index, bias = graph_inputs(10, 10, 40, heads=2, head_dim=16, dtype=torch.bfloat16)
    out = edge_attention(q, k, v, edge_index, edge_bias=bias, backend="triton")
    assert out.dtype == torch.bfloat16
    grads = gradients(out, (q, k, v, bias))
    assert grads[0].dtype == torch.bfloat16 and grads[3].dtype == torch.float32
    as32 = [t.detach().float().requires_grad_() for t in (q, k, v, bias)]
    reference = edge_attention_reference(*as32[:3], edge_index, edge_bias=as32[3])
    assert_close_relative(out, reference, 1e-2, "output")
    for name, got, want in zip("q k v bias".split(), grads, gradients(reference, as32)):
        assert_close_relative(got, want, 2e-2, f"d{name}")


def test_edge_kernel_bias_without_gradient_and_no_edges():
    q, k, v, edge_index, bias = graph_inputs(6, 7, 20, heads=2, head_dim=4, dtype=torch.float32)
    fixed_bias = bias.detach()
    out = edge_attention(q, k, v, edge_index, edge_bias=fixed_bias, backend="triton")
    reference = edge_attention(q, k, v, edge_index, edge_bias=fixed_bias, backend="reference")
    assert_close_relative(out, reference, 1e-5, "output")
    for name, got, want in zip("qkv", gradients(out, (q, k, v)), gradients(reference, (q, k, v))):
        assert_close_relative(got, want, 1e-5, f"d{name}")

    no_edges = torch.empty(2, 0, dtype=torch.long, device=DEVICE)
    out = edge_attention(q, k, v, no_edges, backend="triton")
    assert torch.all(out == 0)
    assert all(torch.all(g == 0) for g in gradients(out, (q, k, v)))


def test_edge_kernel_scale():
    q, k, v, edge_index, _ = graph_inputs(8, 8, 30, heads=2, head_dim=4, dtype=torch.float32)
    out = edge_attention(q, k, v, edge_index, scale=0.3, backend="triton")
    reference = edge_attention(q, k, v, edge_index, scale=0.3, backend="reference")
    assert_close_relative(out, reference, 1e-5, "output")
    assert not torch.allclose(out, edge_attention(q, k, v, edge_index, backend="reference"))

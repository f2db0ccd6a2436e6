"""The CPU fast paths against the plain torch ops they replace: packed weights (engine/matmul.py)
and the bf16 attention (engine/gathered_attention.py grouped_decode_attention, grouped_causal_attention)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.matmul import linear, packs, prepare
from engine.gathered_attention import grouped_causal_attention, grouped_decode_attention


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 3, 16, 77])
def test_a_prepared_weight_gives_the_plain_product_and_a_packed_one_frees_the_original(dtype, tol, rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.nn.Parameter(torch.randn(96, 40, generator=g).to(dtype), requires_grad=False)
    x = torch.randn(rows, 40, generator=g).to(dtype)
    expected = F.linear(x, weight)
    # oneDNN packs bf16 only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT; elsewhere the weight stays plain
    native = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert packs(weight) == native
    packed = prepare(weight)
    if native:
        assert packed.is_mkldnn and weight.numel() == 0  # the row-major copy is released
    else:
        assert packed is weight and weight.numel() == 96 * 40
    got = linear(x, packed)
    assert got.shape == expected.shape and got.dtype == dtype and not got.is_mkldnn
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    assert torch.equal(linear(x[None], packed)[0], got)  # a leading batch dimension


def test_weights_off_the_cpu_or_in_other_dtypes_stay_as_they_are():
    for weight in (torch.nn.Parameter(torch.empty(8, 4, device="meta")),
                   torch.nn.Parameter(torch.randn(8, 4).half())):
        assert not packs(weight)
        assert prepare(weight) is weight and weight.numel() == 32


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch,heads,kv_heads", [(1, 4, 4), (5, 9, 3), (3, 8, 1)])
def test_grouped_decode_attention_equals_sdpa(dtype, tol, batch, heads, kv_heads):
    g = torch.Generator().manual_seed(batch * heads)
    length, dim = 48, 16
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    keys, vals = (torch.randn(batch, length, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    visible = torch.arange(length)[None, :] < lengths[:, None]
    mask = torch.zeros(batch, length, dtype=dtype).masked_fill_(~visible, float("-inf")).view(batch, 1, 1, length)
    expected = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys.float().transpose(1, 2),
                                              vals.float().transpose(1, 2), attn_mask=mask.float(),
                                              scale=dim ** -0.5, enable_gqa=True).squeeze(2)
    got = grouped_decode_attention(q, keys, vals, mask, dim ** -0.5)
    assert got.shape == (batch, heads, dim) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("start,new,heads,kv_heads", [(0, 13, 9, 3), (0, 1, 4, 4), (7, 6, 8, 2), (20, 1, 6, 1)])
def test_grouped_causal_attention_equals_sdpa(dtype, tol, start, new, heads, kv_heads):
    """Whole prompts and extensions of a cached context, with the queries in chunks of 5 rows."""
    g = torch.Generator().manual_seed(start * 31 + new)
    dim, length = 16, start + new
    q = torch.randn(new, heads, dim, generator=g).to(dtype)
    keys, vals = (torch.randn(length, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    sees = torch.arange(length)[None, :] <= torch.arange(start, length)[:, None]
    expected = F.scaled_dot_product_attention(q.float().transpose(0, 1), keys.float().transpose(0, 1),
                                              vals.float().transpose(0, 1), attn_mask=sees, scale=dim ** -0.5,
                                              enable_gqa=True).transpose(0, 1)
    got = grouped_causal_attention(q, keys, vals, start, dim ** -0.5, rows_per_chunk=5)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)

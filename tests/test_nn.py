import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.modeling import flops
from harness.modeling.nn import CausalConv, CausalSelfAttention, sliding_window_attention


def band_mask(length: int, window: int) -> torch.Tensor:
    i = torch.arange(length)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 90), window=st.integers(1, 40))
def test_sliding_window_equals_band_masked_attention(length, window):
    torch.manual_seed(length * 100 + window)
    q, k, v = torch.randn(3, 2, 3, length, 8).unbind(0)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(length, window))
    torch.testing.assert_close(sliding_window_attention(q, k, v, window), expected, atol=1e-5, rtol=1e-5)


def test_windowed_attention_cost_grows_linearly_with_length():
    dim, window = 32, 16
    attn = CausalSelfAttention(dim, 4, window)
    counted = {}
    for length in (256, 512, 1024):
        x = torch.randn(1, length, dim)
        projections = flops.linear(length, dim, 3 * dim) + flops.linear(length, dim, dim)
        counted[length] = flops.measure_forward(attn, x) - projections
        assert counted[length] == flops.attention_products(length, flops.attention_keys(length, window), dim)
    # O(T * w): doubling T doubles the attention products (full attention would quadruple them)
    assert counted[512] == 2 * counted[256] and counted[1024] == 2 * counted[512]


def test_full_attention_counts_t_squared():
    dim, length = 32, 100
    x = torch.randn(1, length, dim)
    attn = CausalSelfAttention(dim, 4)
    expected = flops.linear(length, dim, 4 * dim) + flops.attention_products(length, length, dim)
    assert flops.measure_forward(attn, x) == expected


def test_causal_conv_sees_only_the_past():
    conv = CausalConv(6)
    torch.nn.init.normal_(conv.conv.weight)
    x = torch.randn(1, 20, 6)
    y = conv(x)
    x2 = x.clone()
    x2[:, 10] += 1.0
    y2 = conv(x2)
    assert torch.equal(y[:, :10], y2[:, :10])
    assert not torch.equal(y[:, 10:14], y2[:, 10:14])

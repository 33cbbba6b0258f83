"""The exact baseline layer equals torch's own nn.MultiheadAttention with the same weights."""

import torch
from torch import nn

import zoo


def test_layer_equals_torch_multihead_attention():
    dim, heads = 32, 4
    ours = zoo.create("softmax-attention", dim=dim, heads=heads).double()
    ref = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.to_qkv.weight)
        ref.out_proj.weight.copy_(ours.to_out.weight)
        ours.to_out.bias.zero_()
    x = torch.randn(2, 37, dim, dtype=torch.float64)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 25:] = False
    # the shell sets padded tokens to zero before the projections (so garbage there cannot reach
    # a real output): torch's layer gets them as zeros, and then every row agrees, padded ones too
    filled = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    expected, _ = ref(filled, filled, filled, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(ours(x, mask=mask), expected, rtol=1e-10, atol=1e-12)
    # and at the real tokens, what the padded tokens held does not matter
    unfilled, _ = ref(x, x, x, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(ours(x, mask=mask)[mask], unfilled[mask], rtol=1e-10, atol=1e-12)

"""Informer (ProbSparse): the top-u queries by the sampled max-mean measurement get exact softmax
attention, the others the mean (or, masked, the cumulative sum) of the values, checked against a
query-by-query computation; a block of queries sharing one sample is the per-query form with that
sample repeated; the sample is seeded; the masked form is not causal."""

import math

import pytest
import torch

import zoo
from zoo import probe
from zoo.core.softmax import softmax_attention
from zoo.entries.informer import probsparse_attention, sample_size, sampled_scores, seeded_sample


def tensors(n=37, b=2, h=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    sample = torch.randint(n, (n, 7), generator=g)
    return q, k, v, sample


def oracle(q, k, v, sample, mask, factor, masked):
    """Query by query: the measurement over the sampled real keys, a sort, then each row."""
    b, h, n, d = q.shape
    mask = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    u = min(n, max(1, factor * math.ceil(math.log(n))))
    out = torch.empty_like(v)
    for bi in range(b):
        real = mask[bi].nonzero().flatten().tolist()
        for hi in range(h):
            gap = {}
            for i in real:
                s = [float(q[bi, hi, i] @ k[bi, hi, j]) / d ** 0.5 for j in sample[i].tolist() if j in real]
                gap[i] = (max(s) - sum(s) / len(real)) if s else -math.inf
            active = sorted(gap, key=gap.get, reverse=True)[:u]
            for i in range(n):
                seen = [j for j in real if not masked or j <= i]
                if i in active:
                    w = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in seen]) / d ** 0.5
                    out[bi, hi, i] = w.softmax(0) @ v[bi, hi, seen]
                elif masked:
                    out[bi, hi, i] = v[bi, hi, seen].sum(0) if seen else 0.0
                else:
                    out[bi, hi, i] = v[bi, hi, real].mean(0)
    return out


@pytest.mark.parametrize("masked", [False, True], ids=["encoder", "masked-decoder"])
@pytest.mark.parametrize("factor", [1, 2])
def test_active_queries_exact_others_mean_or_cumulative_sum(masked, factor):
    q, k, v, sample = tensors()
    out = probsparse_attention(q, k, v, sample, factor=factor, masked=masked)
    torch.testing.assert_close(out, oracle(q, k, v, sample, None, factor, masked), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["encoder", "masked-decoder"])
def test_padding_is_left_out_of_measurement_softmax_and_mean(masked):
    q, k, v, sample = tensors()
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    out = probsparse_attention(q, k, v, sample, mask, factor=1, masked=masked)
    expected = oracle(q, k, v, sample, mask, 1, masked)
    keep = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[keep], expected[keep], rtol=1e-12, atol=1e-12)


def test_all_queries_active_is_softmax_attention():
    q, k, v, sample = tensors()  # u = 10 * ceil(ln 37) = 40 >= 37
    torch.testing.assert_close(probsparse_attention(q, k, v, sample, factor=10),
                               softmax_attention(q, k, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probsparse_attention(q, k, v, sample, factor=10, masked=True),
                               softmax_attention(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


def per_query(sample, block, n):
    """Query i's keys under a block-shared sample: row i // block."""
    return sample.repeat_interleave(block, dim=0)[:n]


@pytest.mark.parametrize("block", [4, 5, 64], ids=["whole-blocks", "partial-last-block", "one-block"])
def test_block_shared_scores_are_the_per_query_scores(block):
    q, k, _, _ = tensors()
    g = torch.Generator().manual_seed(1)
    sample = torch.randint(37, (-(-37 // block), 7), generator=g)
    keys = k[:, :, per_query(sample, block, 37)]  # (b h i s d): each query's keys, gathered one by one
    torch.testing.assert_close(sampled_scores(q, k, sample, block),
                               torch.einsum("bhid,bhisd->bhis", q, keys), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["encoder", "masked-decoder"])
@pytest.mark.parametrize("block", [4, 5, 64], ids=["whole-blocks", "partial-last-block", "one-block"])
def test_block_shared_sample_is_the_per_query_form_with_that_sample(masked, block):
    q, k, v, _ = tensors()
    g = torch.Generator().manual_seed(1)
    sample = torch.randint(37, (-(-37 // block), 7), generator=g)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, ::3] = False
    for m in (None, mask):
        out = probsparse_attention(q, k, v, sample, m, factor=1, masked=masked, block=block)
        expected = oracle(q, k, v, per_query(sample, block, 37), m, 1, masked)
        keep = (torch.ones(2, 37, dtype=torch.bool) if m is None else m)[:, None, :, None].expand_as(out)
        torch.testing.assert_close(out[keep], expected[keep], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [1, 8])
def test_sampling_every_key_picks_the_queries_with_the_largest_exact_gap(block):
    """With every key in every block's sample the measurement is exact: the active queries are the
    top u by max minus mean of their full score row, and only they get softmax rows."""
    q, k, v, _ = tensors(n=40, b=1, h=2)
    q = q * torch.linspace(0.1, 3, 40, dtype=q.dtype)[:, None]  # spread the gaps
    sample = torch.arange(40).expand(-(-40 // block), 40)
    out = probsparse_attention(q, k, v, sample, factor=2, block=block)
    scores = q @ k.transpose(-1, -2) / 2  # d = 4
    top = (scores.amax(-1) - scores.mean(-1)).topk(sample_size(40, 2), dim=-1).indices  # (b h u)
    active = torch.zeros(1, 2, 40, dtype=torch.bool).scatter(-1, top, True)[..., None]
    expected = torch.where(active, softmax_attention(q, k, v), v.mean(2, keepdim=True))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [1, 64])
def test_layer_draws_one_seeded_sample_per_block(block):
    layer = zoo.create("informer", dim=16, heads=2, factor=1, block=block, seed=3).double().eval()
    q, k, v, _ = tensors(n=100)
    s = sample_size(100, 1)
    sample = seeded_sample(100, (-(-100 // block), s), 3)
    torch.testing.assert_close(layer.attend(q, k, v), oracle(q, k, v, per_query(sample, block, 100), None, 1,
                                                             False), rtol=1e-12, atol=1e-12)


def test_seeded_sample_is_uniform_and_depends_on_the_seed():
    n = 37
    draws = seeded_sample(n, (400, 37), seed=0)
    assert draws.min() >= 0 and draws.max() < n
    counts = torch.bincount(draws.flatten(), minlength=n).double()
    expected = draws.numel() / n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 80  # 36 degrees of freedom: p < 1e-4 above 72
    assert torch.equal(draws, seeded_sample(n, (400, 37), seed=0))
    assert (draws != seeded_sample(n, (400, 37), seed=1)).float().mean() > 0.9
    # neighbouring slots are not in step (an affine hash would make them so)
    flat = draws.flatten().double()
    assert torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].abs() < 0.05


def test_sample_rows_must_match_the_blocks():
    q, k, v, sample = tensors()  # 37 rows
    with pytest.raises(ValueError, match="ceil"):
        probsparse_attention(q, k, v, sample, block=4)


def test_effective_map_has_u_softmax_rows_and_uniform_rest():
    layer = zoo.create("informer", dim=16, heads=2, factor=1).double().eval()
    a = probe.attention_matrix(layer, n=30)  # u = ceil(ln 30) = 4
    uniform = torch.isclose(a, torch.full_like(a, 1 / 30), rtol=0, atol=1e-15).all(-1)  # (h, n)
    assert (uniform.sum(-1) == 26).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 30, dtype=torch.float64))


def test_key_sample_is_seeded_in_eval_and_fresh_in_training():
    x = torch.randn(1, 50, 16)
    a, b = (zoo.create("informer", dim=16, heads=2, factor=1, seed=s).eval() for s in (0, 1))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), a(x)) and not torch.equal(a(x), b(x))
    torch.manual_seed(0)
    a.train()
    assert not torch.equal(a(x), a(x))


def test_masked_form_is_not_causal():
    """Why autoregressive is false: changing only the last token changes an earlier output of the
    masked form (the top-u selection ranks every query)."""
    q, k, v, sample = tensors(n=16, b=1, h=1)
    out = probsparse_attention(q, k, v, sample, factor=1, masked=True)
    q2 = q.clone()
    q2[..., -1, :] *= 50  # the last query now has the largest gap and takes an active slot
    changed = probsparse_attention(q2, k, v, sample, factor=1, masked=True)
    assert not torch.allclose(changed[..., :-1, :], out[..., :-1, :])


def test_layer_refuses_causal():
    with pytest.raises(ValueError, match="causal"):
        zoo.create("informer", dim=16, causal=True)

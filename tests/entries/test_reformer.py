"""Reformer: the one-bucket limit, bucket-restricted support, the shared-QK self rule and the
multi-round union, each against a limit written here; the fast path equals the reference (the
dense round-by-round form); padded tokens reach nothing, not even another row."""

import pytest
import torch
import torch.nn.functional as F

import zoo
import zoo.core.sorting as sorting
import zoo.entries.reformer as reformer
from tests.layer_checks import (
    assert_dtype_mismatch_is_refused,
    assert_empty_batch_gives_empty_output,
    assert_masked_garbage_changes_nothing,
    assert_unchanged_with_references,
)
from tests.oracles import assert_same_outputs_and_grads
from zoo.entries.reformer import (
    Reformer,
    lsh_buckets_reference,
    reformer_attention,
    reformer_attention_reference,
)
from zoo.probe import attention_matrix


def qkv(b=2, h=2, n=37, d=8, e=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


def oracle(q, k, v, allowed, mask=None, causal=False):
    """Softmax over `allowed` `(b, h, i, j)` minus the diagonal, unless the diagonal is all a row
    has (the paper's shared-QK rule)."""
    n = q.shape[2]
    allowed = allowed.clone()
    if mask is not None:
        allowed &= mask[:, None, None, :]
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    eye = torch.eye(n, dtype=torch.bool)
    others = (allowed & ~eye).any(-1, keepdim=True)
    allowed = torch.where(others, allowed & ~eye, eye.expand_as(allowed))
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_one_chunk_is_softmax_attention_without_self(causal):
    q, k, v = qkv()
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False
    one = torch.randn(3, 8, 0, dtype=torch.float64)  # one bucket: no rotation columns
    out = reformer_attention(q, k, v, one, mask, chunk_size=64, causal=causal)
    ref = oracle(q, k, v, torch.ones(2, 2, 37, 37, dtype=torch.bool), mask, causal)
    torch.testing.assert_close(out[mask[:, None].expand(-1, 2, -1)],
                               ref[mask[:, None].expand(-1, 2, -1)], rtol=1e-10, atol=1e-12)


def test_layer_shares_qk_and_matches_the_oracle_with_gradients():
    layer = zoo.create("reformer", dim=32, heads=2, n_buckets=1, chunk_size=64, causal=True).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64, requires_grad=True)
    q, v = layer.to_qv(x).chunk(2, dim=-1)
    q, v = (t.unflatten(-1, (2, 16)).transpose(1, 2) for t in (q, v))
    ref = oracle(q, F.normalize(q, dim=-1), v, torch.ones(2, 2, 21, 21, dtype=torch.bool),
                 causal=True)
    ref = layer.to_out(ref.transpose(1, 2).flatten(2))
    assert_same_outputs_and_grads(layer(x), ref, (x,))


def test_attends_only_to_keys_of_its_own_bucket():
    layer = Reformer(32, heads=2, n_hashes=1, n_buckets=8, chunk_size=8, seed=3).double()
    q, k, _ = qkv(b=1, n=48, d=16, seed=1)
    a = attention_matrix(layer, q=q, k=k)  # (h, i, j)
    qb, kb = (lsh_buckets_reference(t, layer.rotations)[0, ..., 0] for t in (q, k))
    same = qb[:, :, None] == kb[:, None, :]
    eye = torch.eye(48, dtype=torch.bool)
    assert (a[~(same | eye)] == 0).all()
    assert (a[same & ~eye] > 0).sum() > 48  # it does attend within buckets
    # Each row is a distribution, or empty where no same-bucket key falls in the query's chunks
    # (with independent q and k; under shared QK a query always has its own key).
    sums = a.sum(-1)
    assert (((sums - 1).abs() < 1e-12) | (sums == 0)).all() and (sums == 0).sum() < 10


def test_token_never_attends_to_itself_unless_it_has_nothing_else():
    layer = Reformer(32, heads=2, n_hashes=2, n_buckets=16, chunk_size=4, causal=True).double()
    q, _, _ = qkv(b=1, n=40, d=16, seed=2)
    a = attention_matrix(layer, q=q, k=F.normalize(q, dim=-1))  # shared QK, as the layer does
    diag = a.diagonal(dim1=-2, dim2=-1)
    alone = diag > 0
    # Wherever a token attends to itself, that is all it attends to.
    torch.testing.assert_close(diag[alone], torch.ones_like(diag[alone]))
    assert ((a - torch.diag_embed(diag)).sum(-1)[alone] == 0).all()
    assert alone[:, 0].all() and (~alone).sum() > 40  # token 0 has only itself; most have others


def test_rounds_merge_into_softmax_over_the_union_of_buckets():
    """With chunks covering every token, the log N correction makes the merged rounds exactly the
    softmax over all keys that share a bucket with the query in some round."""
    q, k, v = qkv(n=30, d=8)
    rotations = torch.randn(4, 8, 2, generator=torch.Generator().manual_seed(5),
                            dtype=torch.float64)
    out = reformer_attention(q, k, v, rotations, chunk_size=32)
    qb, kb = lsh_buckets_reference(q, rotations), lsh_buckets_reference(k, rotations)
    union = (qb[:, :, :, None, :] == kb[:, :, None, :, :]).any(-1)
    torch.testing.assert_close(out, oracle(q, k, v, union), rtol=1e-10, atol=1e-12)


def test_rotations_are_seeded_buffers():
    a, b, c = (Reformer(32, heads=2, seed=s) for s in (0, 0, 1))
    assert "rotations" in dict(a.named_buffers()) and "rotations" not in dict(a.named_parameters())
    assert torch.equal(a.rotations, b.rotations) and not torch.equal(a.rotations, c.rotations)


@pytest.mark.parametrize("causal", [False, True])
def test_shared_qk_path_matches_explicit_unit_keys(causal):
    """The layer's shared-QK path (k=None: keys as the queries rescaled by their inverse norms,
    hashed once, gathered once) equals attend() given k = q / |q| explicitly, with several rounds,
    buckets and chunks, padding to a multiple of the chunk and a key-padding mask; gradients too."""
    q, _, v = qkv(n=37, d=8, seed=4)
    q.requires_grad_(True)
    rotations = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 29:] = False
    kw = dict(chunk_size=8, causal=causal)
    fast = reformer_attention(q, None, v, rotations, mask, **kw)
    slow = reformer_attention(q, F.normalize(q, dim=-1), v, rotations, mask, **kw)
    assert_same_outputs_and_grads(fast, slow, (q,))


def test_lsh_buckets_by_hand():
    """Two rotation columns: x R = (1, -3) -> [xR; -xR] = (1, -3, -1, 3), bucket 3."""
    rotations = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])  # (r d f)
    x = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 2)
    assert lsh_buckets_reference(x, rotations).item() == 3
    assert reformer.lsh_buckets(x, rotations).item() == 3


@pytest.mark.parametrize("shared", [True, False], ids=["shared-qk", "separate-k"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fast_path_equals_reference_with_gradients(shared, causal):
    """Several rounds, buckets and chunks, a length no chunk multiple, a key-padding mask."""
    q, k, v = (t.requires_grad_() for t in qkv(n=37, d=8, seed=7))
    rotations = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, 3::4] = False
    kw = dict(chunk_size=8, causal=causal)
    keys = None if shared else k
    out = reformer_attention(q, keys, v, rotations, mask, **kw)
    ref = reformer_attention_reference(q, keys, v, rotations, mask, **kw)
    real = mask[:, None, :, None]
    assert_same_outputs_and_grads(out * real, ref * real, (q, k, v) if not shared else (q, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_layer_is_unchanged_with_the_references(monkeypatch, causal):
    layer = zoo.create("reformer", dim=32, heads=2, n_hashes=2, n_buckets=4, chunk_size=8,
                       causal=causal)
    assert_unchanged_with_references(monkeypatch, layer, [
        (reformer, "reformer_attention", reformer_attention_reference),
        (reformer, "bucket_attention", sorting.bucket_attention_reference),
        (reformer, "lsh_buckets", lsh_buckets_reference)])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masked_garbage_and_empty_batch(causal):
    layer = zoo.create("reformer", dim=32, heads=2, n_hashes=2, n_buckets=4, chunk_size=8,
                       causal=causal)
    assert_masked_garbage_changes_nothing(layer)
    assert_empty_batch_gives_empty_output(layer)
    assert_dtype_mismatch_is_refused(layer)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_garbage_at_padded_tokens_stays_in_its_row_forward_and_backward(value, causal):
    """The sorted windows run over all (batch, head) rows one after another, so sample 1's first
    chunk looks back at sample 0's last, where its padded tokens sort: garbage in q or v there
    changes neither sample 1 nor sample 0's real outputs, nor their gradients."""
    q, _, v = qkv(n=37, d=8, seed=9)
    rotations = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 25:] = False
    padded = ~mask[:, None, :, None]

    def run(fill):
        qs, vs = (t.masked_fill(padded, fill).requires_grad_() for t in (q, v))
        out = reformer_attention(qs, None, vs, rotations, mask, chunk_size=8, causal=causal)
        real = out * mask[:, None, :, None]
        grads = torch.autograd.grad(real.square().sum(), (qs, vs))
        return [real, *(g.masked_fill(padded, 0.0) for g in grads)]

    for got, want in zip(run(value), run(0.0), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_windows_stay_in_their_row_even_for_non_finite_real_tokens(causal):
    """Every (batch, head) row's first chunk looks back at filled rows of its own, not at the row
    before: inf at a real token of sample 0 (which poisons sample 0) leaves sample 1, its output
    and its gradients, exactly as with a finite value there."""
    q, _, v = qkv(n=37, d=8, seed=10)
    rotations = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def run(value):
        vs = v.clone()
        vs[0, :, :] = value  # every value of sample 0: its last sorted chunk too
        qs, vs = q.clone().requires_grad_(), vs.requires_grad_()
        out = reformer_attention(qs, None, vs, rotations, None, chunk_size=8, causal=causal)
        grads = torch.autograd.grad(out[1].square().sum(), (qs, vs))
        return [out[1], *(grad[1] for grad in grads)]

    for got, want in zip(run(float("inf")), run(1.0), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
def test_scale_is_the_factor_of_the_scores(scale):
    """`scale`: one bucket, one chunk, the layer is the oracle with scores q . k / |k| times
    `scale` (None: 1 / sqrt(d), as without the keyword)."""
    layer = zoo.create("reformer", dim=32, heads=2, n_buckets=1, chunk_size=64, scale=scale).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    q, v = layer.to_qv(x).chunk(2, dim=-1)
    q, v = (t.unflatten(-1, (2, 16)).transpose(1, 2) for t in (q, v))
    factor = 16 ** -0.5 if scale is None else scale
    # the oracle divides by sqrt(d): the keys scaled to give `factor` in all
    keys = F.normalize(q, dim=-1) * factor * 16 ** 0.5
    ref = oracle(q, keys, v, torch.ones(2, 2, 21, 21, dtype=torch.bool))
    ref = layer.to_out(ref.transpose(1, 2).flatten(2))
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1.0, "1", True])
def test_scale_refuses_what_is_not_a_positive_number(bad):
    with pytest.raises(ValueError, match="scale"):
        zoo.create("reformer", dim=32, heads=2, scale=bad)

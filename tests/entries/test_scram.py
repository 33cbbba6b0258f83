"""SCRAM: PatchMatch finds the best key where matches are coherent, never trades a match for a
worse one, and the layer attends to the window around the best key (against brute force)."""


import pytest
import torch
import torch.nn.functional as F

from zoo.entries.scram import Scram, patchmatch, patchmatch_reference

SHIFT = 7


def coherent_qk(n=64, d=16, seed=0):
    """Unit queries; key j is query j - 7, so the best key of query i < n - 7 is i + 7."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, 2, n, d, generator=g, dtype=torch.float64), dim=-1)
    head = F.normalize(torch.randn(1, 2, SHIFT, d, generator=g, dtype=torch.float64), dim=-1)
    return q, torch.cat([head, q[:, :, :n - SHIFT]], dim=2)


def test_patchmatch_finds_the_best_key_where_matches_are_coherent():
    q, k = coherent_qk()
    layer = Scram(32, heads=2, iterations=2)
    m = patchmatch(q, k, layer.draws, iterations=2)
    best = (q @ k.transpose(-1, -2)).argmax(-1)  # brute force
    assert torch.equal(m[..., :64 - SHIFT], best[..., :64 - SHIFT])
    assert torch.equal(best[..., :64 - SHIFT], torch.arange(SHIFT, 64).expand(1, 2, -1))


def test_more_iterations_never_lower_a_match_score():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, 50, 8, generator=g, dtype=torch.float64) for _ in range(2))
    draws = Scram(32, heads=2, iterations=4).draws
    scores = [torch.gather(q @ k.transpose(-1, -2), -1,
                           patchmatch(q, k, draws, iterations=t).unsqueeze(-1)).squeeze(-1)
              for t in range(1, 5)]
    for before, after in zip(scores, scores[1:], strict=False):
        assert (after >= before).all()
    assert (scores[-1] > scores[0]).any()


def test_attends_to_the_window_around_the_best_key():
    q, k = coherent_qk()
    v = torch.randn(1, 2, 64, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    window = 6
    layer = Scram(32, heads=2, window=window, iterations=2).double()
    with torch.no_grad():
        out = layer.attend(q, k, v)
    best = (q @ k.transpose(-1, -2)).argmax(-1)
    for h in range(2):
        for i in range(64 - SHIFT):
            start = min(max(best[0, h, i].item() - window // 2, 0), 64 - window)
            keys = slice(start, start + window)
            ref = (k[0, h, keys] @ q[0, h, i] * 16 ** -0.5).softmax(0) @ v[0, h, keys]
            torch.testing.assert_close(out[0, h, i], ref, rtol=1e-10, atol=1e-12)


def test_a_window_of_every_key_is_softmax_attention_with_gradients():
    layer = Scram(32, heads=2, window=64).double()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 29, 16, generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    out, ref = layer.attend(q, k, v), F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_random_draws_are_seeded_buffers():
    a, b, c = (Scram(32, heads=2, seed=s) for s in (0, 0, 1))
    assert "draws" in dict(a.named_buffers()) and "draws" not in dict(a.named_parameters())
    assert torch.equal(a.draws, b.draws) and not torch.equal(a.draws, c.draws)


@pytest.mark.parametrize("min_radius", [1.0, 4.0])
def test_patchmatch_equals_its_reference_one_query_at_a_time(min_radius):
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 28:] = False
    mask[1, 5:8] = False
    draws = Scram(32, heads=2, iterations=3).draws
    for m in (None, mask):
        got = patchmatch(q, k, draws, m, iterations=3, min_radius=min_radius)
        ref = patchmatch_reference(q, k, draws, m, iterations=3, min_radius=min_radius)
        assert torch.equal(got, ref)

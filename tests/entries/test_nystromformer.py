"""Nyströmformer: the pseudo-inverse iteration against torch.linalg.pinv, softmax attention with
as many landmarks as tokens, the three-kernel formula, segment means, and padding."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.entries.nystromformer import iterative_pinv, nystrom_attention, segment_means


def qkv(b=2, h=3, n=37, d=8, e=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


def paper_pinv(a, iters):
    """The paper's iteration, written out per matrix with torch's matrix norms."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    out = []
    for m in a.reshape(-1, *a.shape[-2:]):
        z = m.T / (torch.linalg.matrix_norm(m, ord=1) * torch.linalg.matrix_norm(m, ord=float("inf")))
        for _ in range(iters):
            mz = m @ z
            z = 0.25 * z @ (13 * eye - mz @ (15 * eye - mz @ (7 * eye - mz)))
        out.append(z)
    return torch.stack(out).reshape(a.shape)


def nystrom_oracle(q, k, v, m, iters):
    """The three softmax kernels from reshape-and-mean landmarks (m divides n), no mask."""
    b, h, n, d = q.shape
    q_l = q.reshape(b, h, m, n // m, d).mean(3)
    k_l = k.reshape(b, h, m, n // m, d).mean(3)
    s = d ** -0.5
    f = torch.softmax(q @ k_l.transpose(-1, -2) * s, -1)
    a = torch.softmax(q_l @ k_l.transpose(-1, -2) * s, -1)
    bt = torch.softmax(q_l @ k.transpose(-1, -2) * s, -1)
    return f @ paper_pinv(a, iters) @ bt @ v


def landmark_kernel(n=48, m=12, seed=0):
    q, k, _ = qkv(n=n, seed=seed)
    q_l, _ = segment_means(q, m, None)
    k_l, _ = segment_means(k, m, None)
    return torch.softmax(q_l @ k_l.transpose(-1, -2) / 8 ** 0.5, -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pinv_iteration_converges_to_torch_pinv(seed):
    a = landmark_kernel(seed=seed)
    exact = torch.linalg.pinv(a)
    errors = [((iterative_pinv(a, it) - exact).norm() / exact.norm()).item() for it in (2, 6, 12, 40)]
    assert errors[-1] < 1e-9, errors
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors


def test_pinv_iteration_converges_on_a_rank_deficient_kernel():
    """Masked landmarks leave zero columns; the iteration still reaches the pseudo-inverse."""
    a = landmark_kernel()
    a[..., 9:] = 0.0
    a = a / a.sum(-1, keepdim=True)
    exact = torch.linalg.pinv(a, hermitian=False)
    torch.testing.assert_close(iterative_pinv(a, 60), exact, rtol=1e-8, atol=1e-8)


def test_pinv_iteration_is_the_papers():
    a = landmark_kernel()
    torch.testing.assert_close(iterative_pinv(a, 6), paper_pinv(a, 6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_as_many_landmarks_as_tokens_is_softmax_attention(masked):
    q, k, v = qkv()
    mask = None
    if masked:
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[0, 30:] = False
        mask[1, ::3] = False
    out = nystrom_attention(q, k, v, mask, landmarks=37, pinv_iters=40)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None
                                         else mask[:, None, None, :])
    if mask is not None:  # compare the real query rows
        out, ref = out.transpose(1, 2)[mask], ref.transpose(1, 2)[mask]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_three_kernel_formula():
    q, k, v = qkv(n=36)
    torch.testing.assert_close(nystrom_attention(q, k, v, landmarks=6, pinv_iters=6),
                               nystrom_oracle(q, k, v, 6, 6), rtol=1e-10, atol=1e-12)


def test_gradients_match_the_formula():
    q, k, v = (t.requires_grad_() for t in qkv(n=12))
    grads = torch.autograd.grad(nystrom_attention(q, k, v, landmarks=4).square().sum(), (q, k, v))
    ref = torch.autograd.grad(nystrom_oracle(q, k, v, 4, 6).square().sum(), (q, k, v))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_segment_means_of_an_uneven_length():
    """n = 37 and m = 8: segments of 5 positions, the last one holding the 2 tokens 35 and 36."""
    t, _, _ = qkv()
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 3] = False
    means, live = segment_means(t, 8, mask)
    for b in range(2):
        for i in range(8):
            pos = [j for j in range(5 * i, min(5 * i + 5, 37)) if mask[b, j]]
            torch.testing.assert_close(means[b, :, i], t[b, :, pos].mean(1), rtol=1e-12, atol=1e-12)
    assert live.all()


def test_fewer_tokens_than_landmarks_leaves_the_extra_landmarks_out():
    """n = 5 < m = 8: one token per segment, three empty landmarks; that is m = 5 exactly."""
    q, k, v = qkv(n=5)
    torch.testing.assert_close(nystrom_attention(q, k, v, landmarks=8),
                               nystrom_oracle(q, k, v, 5, 6), rtol=1e-10, atol=1e-12)


def test_tail_padding_equals_the_shorter_sequence():
    """n = 40, m = 8 (segments of 5) with the last 10 tokens padded: the real outputs equal
    Nyström attention on the 30 real tokens with 6 landmarks."""
    q, k, v = qkv(n=40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[:, 30:] = False
    out = nystrom_attention(q, k, v, mask, landmarks=8)
    ref = nystrom_oracle(q[:, :, :30], k[:, :, :30], v[:, :, :30], 6, 6)
    torch.testing.assert_close(out[:, :, :30], ref, rtol=1e-10, atol=1e-12)


def test_layer_passes_its_hyper_parameters():
    layer = zoo.create("nystromformer", dim=32, heads=2, landmarks=5, pinv_iters=9).double()
    q, k, v = qkv(h=2, n=20, d=16)
    torch.testing.assert_close(layer.attend(q, k, v), nystrom_oracle(q, k, v, 5, 9),
                               rtol=1e-10, atol=1e-12)

"""Helpers shared by the entries' own tests (tests/entries/): seeded inputs and comparisons."""

import torch


def qkv(n: int = 37, b: int = 2, h: int = 2, d: int = 8, seed: int = 0):
    """Seeded float64 q, k, v, each `(b, h, n, d)`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def outputs_and_grads(out: torch.Tensor, real: torch.Tensor, inputs) -> list[torch.Tensor]:
    """The output at real tokens and the gradients of its squared sum with respect to `inputs`."""
    return [out[real], *torch.autograd.grad((out[real] ** 2).sum(), inputs)]


def assert_equals_restricted_softmax(out, q, k, v, keep, mask, *, rtol=1e-10, atol=1e-12):
    """`out` (and the gradients of its squared sum) equal dense softmax attention restricted to
    `keep` `(b, h, i, j)`, at the real tokens of `mask` `(b, n)`."""
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, torch.finfo(q.dtype).min)
    ref = scores.softmax(-1) @ v
    real = mask[:, None, :, None].expand_as(out)
    for got, want in zip(outputs_and_grads(out, real, (q, k, v)),
                         outputs_and_grads(ref, real, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def assert_same_outputs_and_grads(out, ref, inputs, *, rtol=1e-10, atol=1e-12):
    """`out` equals `ref`, and so do the gradients of their squared sums w.r.t. `inputs`."""
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def assert_equals_at_real_tokens(out, ref, inputs, mask, *, rtol=1e-10, atol=1e-12):
    """`out` equals `ref` `(b, h, n, e)` at the real tokens of `mask` `(b, n)`, and so do the
    gradients of their squared sums there with respect to `inputs`."""
    real = mask[:, None, :, None].expand_as(out)
    for got, want in zip(outputs_and_grads(out, real, inputs), outputs_and_grads(ref, real, inputs),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)

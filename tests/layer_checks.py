"""Checks on a whole layer that several entries' own tests share (tests/entries/): the fast path
against its reference patched in, garbage behind the mask, and the empty batch."""

import pytest
import torch


def padding_mask(b: int = 2, n: int = 37) -> torch.Tensor:
    """`(b, n)`: sample 0 padded at its end and at one inner position, sample 1 at every third
    position from the third; the first token of every sample real."""
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, n - 7:] = False
    mask[0, 5] = False
    mask[1:, 2::3] = False
    return mask


def _outputs_and_grads(layer, x, mask):
    """The output at real tokens and the gradients of a fixed random projection of it with
    respect to the input and every parameter."""
    x = x.detach().requires_grad_()
    real = layer(x, mask=mask)[mask]
    weight = torch.randn(real.shape, generator=torch.Generator().manual_seed(1), dtype=real.dtype)
    params = list(layer.parameters())
    grads = torch.autograd.grad((real * weight).sum(), [x, *params], allow_unused=True)
    return [real.detach(), *(torch.zeros_like(p) if g is None else g
                             for p, g in zip([x, *params], grads, strict=True))]


def assert_unchanged_with_references(monkeypatch, layer, patches, *, n: int = 37) -> None:
    """For each `(module, name, reference)` of `patches` in turn, with `module.name` replaced by
    `reference`: the reference is called, and the layer's real outputs and its gradients (input,
    parameters), in float64 with a padding mask at length `n`, are the same (1e-10)."""
    layer = layer.double()
    x = torch.randn(2, n, layer.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = padding_mask(2, n)
    fast = _outputs_and_grads(layer, x, mask)
    for module, name, reference in patches:
        calls: list[int] = []

        def counted(*args, _reference=reference, _calls=calls, **kwargs):
            _calls.append(1)
            return _reference(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(module, name, counted)
            ref = _outputs_and_grads(layer, x, mask)
        assert calls, f"{module.__name__}.{name} is never called through its module-level name"
        for got, want in zip(fast, ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def assert_masked_garbage_changes_nothing(layer, *, n: int = 37) -> None:
    """NaN, inf or 1e30 at the padded tokens of sample 0 change none of its real outputs and
    nothing of sample 1 (which has no padding), against zeros there."""
    layer = layer.double().eval()
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, n - 7:] = False
    mask[0, ::4] = False
    x = torch.randn(2, n, layer.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    clean = layer(x, mask=mask)
    for value in (float("nan"), float("inf"), 1e30):
        out = layer(x.masked_fill(~mask.unsqueeze(-1), value), mask=mask)
        assert torch.isfinite(out[1]).all() and torch.isfinite(out[0][mask[0]]).all(), value
        torch.testing.assert_close(out[1], clean[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[0][mask[0]], clean[0][mask[0]], rtol=1e-12, atol=1e-12)


def assert_empty_batch_gives_empty_output(layer, *, n: int = 37) -> None:
    """`b = 0`, with and without an (empty) mask, returns an empty `(0, n, dim)` output."""
    x = torch.randn(0, n, layer.dim, dtype=next(layer.parameters()).dtype)
    for mask in (None, torch.ones(0, n, dtype=torch.bool)):
        assert layer(x, mask=mask).shape == (0, n, layer.dim)


def assert_dtype_mismatch_is_refused(layer, *, n: int = 5) -> None:
    """An input whose dtype is not the layer's raises ValueError naming both dtypes."""
    layer = layer.float()
    with pytest.raises(ValueError, match="float64.*float32"):
        layer(torch.randn(1, n, layer.dim, dtype=torch.float64))

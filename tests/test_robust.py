"""The robustness battery (zoo.verify.robust) over the whole catalogue, and each of its checks
failing on a layer planted with the defect it exists to catch.

A new catalogue entry is picked up here with no new test code, with its own `hparams`.
"""

import pytest
import torch
from einops import rearrange

import zoo
from zoo.core.checks import check_sequence, nonnegative_float
from zoo.core.masks import zero_padded
from zoo.core.softmax import softmax_attention
from zoo.entries.softmax_attention import SoftmaxAttention
from zoo.verify.contract import ContractError, factory
from zoo.verify.robust import CHECKS, bad_hparams

FORMS_B = "fixed on branch forms-b"
# Entries in files another branch (forms-b) is rewriting: marked here, not fixed, so that the two
# branches do not edit the same files. strict: the mark fails once the fix lands, to be removed.
KNOWN = {
    ("reformer", "masked-garbage"): FORMS_B,
    ("routing-transformer", "masked-garbage"): FORMS_B,
    **{(i, "empty-batch"): FORMS_B for i in ("longformer", "bigbird", "bp-transformer",
                                               "multiscale-transformer", "reformer",
                                               "routing-transformer", "smyrf")},
    ("longformer", "masked-garbage"): "forms-b's file: its forward must fill padded tokens "
                                      "(zoo.core.masks.zero_padded_tokens) before they mix",
    **{(i, "dtype-mismatch"): "forms-b's file: its forward must pass layer=self to check_sequence"
       for i in ("longformer", "reformer", "routing-transformer")},
}


def _case(name, check):
    reason = KNOWN.get((name, check))
    marks = [pytest.mark.xfail(reason=reason, strict=True, raises=ContractError)] if reason else []
    return pytest.param(check, name, id=f"{name}-{check}", marks=marks)


CASES = [_case(i, check) for i in zoo.names() for check, (_, applies) in CHECKS.items()
         if applies(zoo.entry(i))]


@pytest.mark.parametrize("check, name", CASES)
def test_robust(check, name):
    entry = zoo.entry(name)
    run, _ = CHECKS[check]
    run(entry, factory(entry))


def test_known_failures_are_real_cases():
    """Every mark above names an entry and a check the battery runs (no stale marks)."""
    cases = {(i, check) for i in zoo.names() for check, (_, applies) in CHECKS.items()
             if applies(zoo.entry(i))}
    assert set(KNOWN) <= cases


# --- planted defects -----------------------------------------------------------------------
# Each is softmax attention with one thing wrong; the check must catch it, and pass on the sound
# layer (so it is the defect that is caught).

BASE = zoo.entry("softmax-attention")


class UpdatesSavedBufferInPlace(SoftmaxAttention):
    """In training, a running scale is updated in place after a view of it was saved for backward
    (expectation-maximization-attention's bug)."""

    def __init__(self, dim, **kw):
        super().__init__(dim, **kw)
        self.register_buffer("running", torch.ones(dim))

    def forward(self, x, mask=None):
        out = super().forward(x * self.running.to(x.dtype), mask)
        if self.training:
            with torch.no_grad():
                self.running.mul_(0.9).add_(0.1)
        return out


class TinyClampNormaliser(SoftmaxAttention):
    """Adds the mean of the real values, over a count clamped to the smallest normal number: for a
    fully padded sample the output is finite but the gradient overflows (lambda-networks' bug)."""

    def attend(self, q, k, v, mask=None):
        out = softmax_attention(q, k, v, mask, causal=self.causal)
        if mask is None:
            return out + v.mean(dim=2, keepdim=True)
        weight = rearrange(mask, "b n -> b 1 n 1").to(v.dtype)
        count = weight.sum(dim=2, keepdim=True)
        return out + (v * weight).sum(dim=2, keepdim=True) / count.clamp(min=torch.finfo(v.dtype).tiny)


class LeaksAcrossSamples(SoftmaxAttention):
    """A term over the whole batch: harmless for finite inputs, NaN everywhere for one NaN
    (reformer's and routing-transformer's bug, there through flattened (batch, head) rows)."""

    def forward(self, x, mask=None):
        return super().forward(x, mask) + 0 * x.sum()


class FailsOnEmptyBatch(SoftmaxAttention):
    """Flattens (b, h) and splits it again naming only b: einops cannot infer h when b = 0."""

    def attend(self, q, k, v, mask=None):
        out = softmax_attention(q, k, v, mask, causal=self.causal)
        return rearrange(rearrange(out, "b h n e -> (b h) n e"), "(b h) n e -> b h n e",
                         b=q.shape[0])


class NoDtypeCheck(SoftmaxAttention):
    """Checks the shape but not the dtype: torch's RuntimeError instead of a ValueError."""

    def forward(self, x, mask=None):
        check_sequence(x, self.dim, mask, name="NoDtypeCheck")
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        return self.to_out(self.merge_heads(self.attend(q, k, v, mask)))


class AcceptsAnyEps(SoftmaxAttention):
    """Takes an `eps` and stores it unchecked."""

    def __init__(self, dim, *, eps: float = 1e-6, **kw):
        super().__init__(dim, **kw)
        self.eps = float(eps)


class ValidatesEps(SoftmaxAttention):
    """The sound counterpart of AcceptsAnyEps."""

    def __init__(self, dim, *, eps: float = 1e-6, **kw):
        super().__init__(dim, **kw)
        self.eps = nonnegative_float(eps, "eps")


class AttendIgnoresLengths(SoftmaxAttention):
    """Uses as many keys as there are values, silently."""

    def attend(self, q, k, v, mask=None):
        k = k[:, :, : v.shape[2]]
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return scores.softmax(-1) @ v


class MaskedValuesByProduct(SoftmaxAttention):
    """Projects the unfilled tokens, then zeroes keys and values by a product with the mask (what
    zoo.core.masks.zero_padded did): NaN * 0 is NaN."""

    def forward(self, x, mask=None):
        check_sequence(x, self.dim, mask, name="MaskedValuesByProduct", layer=self)
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        if mask is not None:
            k = k * rearrange(mask, "b n -> b 1 n 1").to(k.dtype)
            v = v * rearrange(mask, "b n -> b 1 n 1").to(v.dtype)
        return self.to_out(self.merge_heads(self.attend(q, k, v, mask)))


PLANTED = [
    # (broken layer, the check that must catch it, the sound layer it must pass)
    (UpdatesSavedBufferInPlace, "train-backward", None),
    (TinyClampNormaliser, "train-backward", None),
    (LeaksAcrossSamples, "masked-garbage", None),
    (MaskedValuesByProduct, "masked-garbage", None),
    (FailsOnEmptyBatch, "empty-batch", None),
    (NoDtypeCheck, "dtype-mismatch", None),
    (AcceptsAnyEps, "bad-hparams", ValidatesEps),
    (AttendIgnoresLengths, "attend-lengths", None),
]


def test_every_check_has_a_planted_defect():
    assert {check for _, check, _ in PLANTED} == set(CHECKS)


@pytest.mark.parametrize("broken, check, sound", PLANTED, ids=[p[0].__name__ for p in PLANTED])
def test_check_catches_planted_defect(broken, check, sound):
    run, applies = CHECKS[check]
    assert applies(BASE)
    with pytest.raises(ContractError):
        run(BASE, factory(BASE, cls=broken))
    run(BASE, factory(BASE, cls=sound))


def test_zero_padded_fills_rather_than_multiplies():
    """The core fill turns NaN into 0 (a product would keep it), with the product's gradient."""
    mask = torch.tensor([[True, False, True]])
    t = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64).view(1, 1, 3, 1)
    assert torch.equal(zero_padded(t, mask).flatten(), torch.tensor([1.0, 0.0, 2.0],
                                                                   dtype=torch.float64))
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((zero_padded(x, mask) * w).sum(), x)
    assert torch.equal(grad, w * mask.view(1, 1, 3, 1))


def test_bad_hparams_are_found_by_signature():
    """The keywords come from the layer's signature, so a new entry's are checked unasked."""
    assert {kw for kw, _ in bad_hparams(AcceptsAnyEps)} == {"eps"}
    assert {kw for kw, _ in bad_hparams(SoftmaxAttention)} == {"dim_head"}
    assert {kw for kw, _ in bad_hparams(zoo.load("expectation-maximization-attention"))} == {
        "lam", "momentum"}


def test_expectation_maximization_updates_its_bases_in_training_only():
    """The fix for training (a clone before the in-place update) keeps the moving average."""
    layer = zoo.create("expectation-maximization-attention", dim=32, bases=8).double()
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64, requires_grad=True)
    before = layer.mu.clone()
    layer.eval()(x)
    assert torch.equal(layer.mu, before)
    layer.train()(x).sum().backward()
    assert not torch.equal(layer.mu, before) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(layer.mu.norm(dim=-1), torch.ones(8, dtype=torch.float64))


def test_dtype_check_stands_aside_under_autocast():
    """Under autocast a bfloat16 activation reaching a float32 layer is normal use, not an error."""
    layer = zoo.create("cbam", dim=32)
    x = torch.randn(2, 32, 5, 5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="torch.bfloat16"):
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).shape == x.shape

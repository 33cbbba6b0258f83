"""Each contract check fails on a layer planted with the defect it exists to catch.

Every broken layer here is a softmax-attention variant with one thing wrong; a check that let it
through would be a check that cannot fail.
"""

import dataclasses

import pytest
import torch
from torch import nn

import zoo
from zoo.core.checks import refuse_causal, refuse_mask
from zoo.core.masks import causal_mask
from zoo.core.softmax import softmax_attention
from zoo.entries.softmax_attention import SoftmaxAttention
from zoo.verify.contract import CHECKS, ContractError, factory

BASE = zoo.entry("softmax-attention")


class PeeksAhead(SoftmaxAttention):
    """Causal, but each token also sees the next one."""

    def attend(self, q, k, v, mask=None):
        if not self.causal:
            return softmax_attention(q, k, v, mask)
        n = q.shape[2]
        allowed = torch.ones(n, n, dtype=torch.bool).tril(1)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, -1e9)
        return scores.softmax(-1) @ v


class IgnoresMask(SoftmaxAttention):
    def attend(self, q, k, v, mask=None):
        return softmax_attention(q, k, v, None, causal=self.causal)


class DeadParameter(SoftmaxAttention):
    def __init__(self, dim, **kw):
        super().__init__(dim, **kw)
        self.unused = nn.Parameter(torch.zeros(3))


class MixesBatch(SoftmaxAttention):
    def forward(self, x, mask=None):
        out = super().forward(x, mask)
        return out + out.mean(0, keepdim=True)


class Noisy(SoftmaxAttention):
    def forward(self, x, mask=None):
        return super().forward(x, mask) + 1e-3 * torch.randn_like(x)


class Overflows(SoftmaxAttention):
    """Softmax without subtracting the max: exp overflows on large inputs."""

    def attend(self, q, k, v, mask=None):
        w = (q @ k.transpose(-1, -2)).exp()
        if self.causal:
            w = w * causal_mask(q.shape[2], k.shape[2])
        return (w / w.sum(-1, keepdim=True)) @ v


class Float32Only(SoftmaxAttention):
    def forward(self, x, mask=None):
        return super().forward(x, mask).float()


class NoShapeCheck(SoftmaxAttention):
    def forward(self, x, mask=None):
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        return self.to_out(self.merge_heads(self.attend(q, k, v, mask)))


class EvenLengthsOnly(SoftmaxAttention):
    def forward(self, x, mask=None):
        if x.shape[1] % 2:
            x = x[:, :-1]
        return super().forward(x, None if mask is None else mask[:, : x.shape[1]])


class AcceptsCausalSilently(SoftmaxAttention):
    def __init__(self, dim, *, causal=False, **kw):
        super().__init__(dim, causal=False, **kw)


class AcceptsMaskSilently(SoftmaxAttention):
    def forward(self, x, mask=None):
        return super().forward(x)


class RefusesCausal(SoftmaxAttention):
    """The sound counterpart for an entry that is not autoregressive."""

    def __init__(self, dim, *, causal=False, **kw):
        refuse_causal("RefusesCausal", causal)
        super().__init__(dim, **kw)


class RefusesMask(SoftmaxAttention):
    """The sound counterpart for an entry without masking."""

    def forward(self, x, mask=None):
        refuse_mask("RefusesMask", mask)
        return super().forward(x)


PLANTED = [
    # (broken layer, catalogue claims it breaks, the check that must catch it)
    (PeeksAhead, {}, "causal"),
    (IgnoresMask, {}, "padding"),
    (DeadParameter, {}, "gradients"),
    (MixesBatch, {}, "batch-independence"),
    (Noisy, {}, "determinism"),
    (Overflows, {}, "finite"),
    (Float32Only, {}, "dtypes"),
    (NoShapeCheck, {}, "bad-shape"),
    (EvenLengthsOnly, {}, "shape"),
    (AcceptsCausalSilently, {"autoregressive": False}, "refuses-causal"),
    (AcceptsMaskSilently, {"masking": False}, "refuses-mask"),
]


def test_every_check_has_a_planted_defect():
    assert {check for _, _, check in PLANTED} == set(CHECKS)


@pytest.mark.parametrize("broken, claims, check", PLANTED, ids=[p[2] for p in PLANTED])
def test_check_catches_planted_defect(broken, claims, check):
    entry = dataclasses.replace(BASE, **claims)
    run, applies = CHECKS[check]
    assert applies(entry)
    with pytest.raises(ContractError):
        run(entry, factory(entry, cls=broken))
    # and the same check passes on a sound layer, so it is the defect that is caught
    sound = {"refuses-causal": RefusesCausal, "refuses-mask": RefusesMask}.get(check)
    run(entry, factory(entry, cls=sound))

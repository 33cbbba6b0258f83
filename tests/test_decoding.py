"""Token-by-token decoding (`layer.step`) over every autoregressive entry, each decoding check shown
to fail on a planted defect, and the decoding claim (state and step exponents) shown to bite."""

import dataclasses

import pytest
import torch

import zoo
from zoo.core import decoding
from zoo.core.linear import kernel_attention, kernel_attention_recurrent, kernel_attention_step
from zoo.core.softmax import softmax_attention
from zoo.entries.linear_transformer import LinearTransformer
from zoo.entries.softmax_attention import SoftmaxAttention
from zoo.verify.claims import claim_decoding
from zoo.verify.contract import ContractError, factory
from zoo.verify.decoding import DECODING_CHECKS, applies, check_step_equals_forward

AUTOREGRESSIVE = [pytest.param(i, id=i) for i in zoo.names(autoregressive=True)
                  if applies(zoo.entry(i))]
CASES = [pytest.param(check, i, id=f"{i}-{check}") for i in zoo.names(autoregressive=True)
         if applies(zoo.entry(i)) for check in DECODING_CHECKS]


@pytest.mark.parametrize("check, name", CASES)
def test_decoding_contract(check, name):
    e = zoo.entry(name)
    DECODING_CHECKS[check](e, factory(e))


@pytest.mark.parametrize("name", AUTOREGRESSIVE)
def test_decoding_is_declared(name):
    d = zoo.entry(name).decoding
    assert d is not None, f"{name}: declare decoding: {{state: p, step: q}} in catalog.yaml"


def test_chunked_kernel_sums_equal_the_one_token_recurrence():
    """The core's chunk-level recurrent form, with a decay and a per-chunk key scale, against the
    one-token loop written out on its own (float64)."""
    g = torch.Generator().manual_seed(0)
    b, h, n, f, e = 2, 3, 29, 5, 4
    phi_q, phi_k = (torch.rand(b, h, n, f, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, h, n, e, generator=g, dtype=torch.float64)
    gates = torch.rand(b, h, n, generator=g, dtype=torch.float64) * 0.5 + 0.5
    expected = kernel_attention_recurrent(phi_q, phi_k, v, gates=gates)
    outs, state, s = [], None, 0
    for t in (1, 6, 1, 9, 12):
        # each chunk's keys arrive scaled down by a different factor, which the state must undo
        shift = torch.rand(b, h, generator=g, dtype=torch.float64) * 4
        scaled_k = phi_k[:, :, s:s + t] * (-shift).exp()[..., None, None]
        out, state = kernel_attention_step(phi_q[:, :, s:s + t], scaled_k, v[:, :, s:s + t], state,
                                           log_decay=gates[:, :, s:s + t].log(), key_log_scale=shift,
                                           chunk=4)
        outs.append(out)
        s += t
    torch.testing.assert_close(torch.cat(outs, dim=2), expected, rtol=1e-10, atol=1e-12)
    # without a decay it is kernel_attention's causal form too
    out, _ = kernel_attention_step(phi_q[:, :, :13], phi_k[:, :, :13], v[:, :, :13])
    torch.testing.assert_close(out, kernel_attention(phi_q, phi_k, v, causal=True)[:, :, :13],
                               rtol=1e-10, atol=1e-12)


def test_softmax_step_is_a_kv_cache_hand_case():
    """One query after two cached keys: softmax over exactly those three scores (by hand)."""
    layer = SoftmaxAttention(4, heads=1, causal=True).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    _, state = layer.step(x[:, :2])
    k_cached, v_cached, mask = state.cache
    assert k_cached.shape == (1, 1, 2, 4) and mask is None
    y, state = layer.step(x[:, 2:], state)
    q, k, v = map(layer.split_heads, layer.to_qkv(x).chunk(3, dim=-1))
    w = torch.softmax((q[0, 0, 2] @ k[0, 0].T) / 2.0, dim=-1)  # scale 1/sqrt(4)
    expected = layer.to_out(w @ v[0, 0])
    torch.testing.assert_close(y[0, 0], expected, rtol=1e-12, atol=1e-12)
    assert state.length == 3 and state.numel() == 2 * 3 * 4


# --- planted defects ---------------------------------------------------------------------------

BASE = zoo.entry("softmax-attention")


class ForgetsOneToken(SoftmaxAttention):
    """A KV cache that drops the oldest key once it holds more than four."""

    def attend_step(self, q, k, v, cache, mask=None, start=0):
        out, (k, v, mask) = super().attend_step(q, k, v, cache, mask, start)
        if k.shape[2] > 4:
            k, v = torch.cat([k[:, :, :1], k[:, :, 2:]], dim=2), torch.cat([v[:, :, :1], v[:, :, 2:]], dim=2)
            mask = None if mask is None else torch.cat([mask[:, :1], mask[:, 2:]], dim=1)
        return out, (k, v, mask)


class LeaksNextToken(SoftmaxAttention):
    """Inside a chunk each new query also reads the next new key."""

    def attend_step(self, q, k, v, cache, mask=None, start=0):
        k, v, mask = cache = decoding.extend_kv(cache, k, v, mask, start)
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(start + 1)
        return softmax_attention(q, k, v, mask, allowed=allowed), cache


class TopLeftCausal(SoftmaxAttention):
    """Forgets the offset: new query i reads keys j <= i of the whole cache."""

    def attend_step(self, q, k, v, cache, mask=None, start=0):
        k, v, mask = cache = decoding.extend_kv(cache, k, v, mask, start)
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        return softmax_attention(q, k, v, mask, allowed=allowed), cache


class IgnoresStepMask(SoftmaxAttention):
    def attend_step(self, q, k, v, cache, mask=None, start=0):
        return super().attend_step(q, k, v, cache, None, start)


class ChangesItsState(SoftmaxAttention):
    """Writes into the cache it was given (a beam reading the same state twice sees the change)."""

    def attend_step(self, q, k, v, cache, mask=None, start=0):
        if cache is not None:
            cache[1].mul_(0.5)
        return super().attend_step(q, k, v, cache, mask, start)


class SkipsChecks(SoftmaxAttention):
    def step(self, x, state=None, *, mask=None):
        cache, start = (None, 0) if state is None else (state.cache, state.length)
        y, cache = self.decode(x, cache, mask, start)
        return y, decoding.DecodeState(x.shape[0], start + x.shape[1], cache)


PLANTED = [
    (ForgetsOneToken, "step_equals_forward"),
    (LeaksNextToken, "step_equals_forward"),
    (TopLeftCausal, "step_equals_forward"),
    (IgnoresStepMask, "step_equals_forward"),
    (ChangesItsState, "step_keeps_state"),
    (SkipsChecks, "step_refuses_bad_use"),
]


def test_every_decoding_check_has_a_planted_defect():
    assert {check for _, check in PLANTED} == set(DECODING_CHECKS)


@pytest.mark.parametrize("broken, check", PLANTED, ids=[p[0].__name__ for p in PLANTED])
def test_decoding_check_catches_planted_defect(broken, check):
    with pytest.raises(ContractError):
        DECODING_CHECKS[check](BASE, factory(BASE, cls=broken))
    DECODING_CHECKS[check](BASE, factory(BASE))  # and the sound layer passes


def test_length_dependent_entry_must_declare_it_and_only_then():
    """jukebox's rows are ceil(sqrt(n)) long: declared exact, its step is caught; and softmax
    attention declaring exact: false is told to drop it."""
    juke = zoo.entry("jukebox")
    assert juke.decoding.get("exact") is False
    check_step_equals_forward(juke, factory(juke))
    as_exact = dataclasses.replace(juke, decoding={k: v for k, v in juke.decoding.items() if k != "exact"})
    with pytest.raises(ContractError, match="forward over the whole sequence"):
        check_step_equals_forward(as_exact, factory(as_exact))
    needless = dataclasses.replace(BASE, decoding={**BASE.decoding, "exact": False})
    with pytest.raises(ContractError, match="drop exact: false"):
        check_step_equals_forward(needless, factory(needless))


# --- the decoding claim ------------------------------------------------------------------------


class RecomputingLinear(LinearTransformer):
    """Linear attention without its recurrent step: the shell's fallback keeps every input."""

    attend_step = SoftmaxAttention.__mro__[1].attend_step  # MultiHead's placeholder


def test_decoding_claim_catches_a_wrong_declaration():
    e = zoo.entry("linear-transformer")
    assert e.decoding["state"] == 0 and e.decoding["step"] == 0
    claim_decoding(e)
    with pytest.raises(ContractError, match="decoding state: measured exponent 1.00"):
        claim_decoding(e, factory(e, cls=RecomputingLinear, dim=32))
    kv = zoo.entry("softmax-attention")
    with pytest.raises(ContractError, match="decoding step: measured exponent 0.9"):
        claim_decoding(dataclasses.replace(kv, decoding={"state": 1, "step": 0}))
    with pytest.raises(ContractError, match="declares no decoding"):
        claim_decoding(dataclasses.replace(kv, decoding=None))

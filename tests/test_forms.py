"""Two forms: for every catalogue entry with a `<function>_reference`, the layer with its fast
function equals the layer with the reference in its place (float64, outputs and gradients, with a
padding mask and causally where claimed, at n = 37). A new entry with a reference is picked up
here with no new test code; the check is shown to fail on planted differences."""

import importlib

import pytest
import torch

import zoo
from zoo.verify import forms
from zoo.verify.contract import ContractError

# The entries issue 17 names, whose fast paths hide their paper's equations: each must keep a
# reference (the audit adds the others it found; they are listed by test_entries_with_references).
REQUIRED = [
    "bigbird", "bp-transformer", "multiscale-transformer", "reformer", "routing-transformer", "smyrf",
    "clustered-attention", "longformer", "star-transformer", "transformer-on-a-diet",
    "performer-favor", "scram", "permutohedral-attention", "attention-free-transformer",
]

CASES = [pytest.param(i, pair, id=f"{i}-{pair.name}")
         for i in zoo.names() for pair in forms.reference_pairs(zoo.entry(i))]


@pytest.mark.parametrize("name, pair", CASES)
def test_fast_path_equals_reference(name, pair):
    forms.check_pair(zoo.entry(name), pair)


def test_entries_with_references():
    """Which entries have two forms (shown with `pytest -s`); those issue 17 names must."""
    have = forms.entries_with_references(zoo.entry(i) for i in zoo.names())
    print("\n".join(f"{i}: {', '.join(pairs)}" for i, pairs in have.items()))
    missing = [i for i in REQUIRED if i not in have]
    assert not missing, f"entries named in issue 17 without a _reference: {missing}"
    # every entry's own reference is the first function of its file (STYLE: the reader meets the
    # math first)
    for i in have:
        module = importlib.import_module(zoo.entry(i).module)
        own = forms.module_pairs(module)
        if own:
            first = next(n for n, v in vars(module).items() if callable(v) and getattr(
                v, "__module__", None) == module.__name__ and not isinstance(v, type))
            assert first.endswith(forms.SUFFIX), f"{i}: the first function is {first}, not a reference"


# --- the check bites ---------------------------------------------------------------------------

PLANT = "performer-favor"


def _pair(name):
    return next(p for p in forms.reference_pairs(zoo.entry(PLANT)) if p.name == name)


def _plant(monkeypatch, wrap):
    """favor_attention's reference replaced by `wrap(reference)`; returns the pair."""
    pair = _pair("favor_attention")
    module = importlib.import_module(pair.module)
    monkeypatch.setattr(module, pair.reference, wrap(getattr(module, pair.reference)))
    return pair


def test_a_reference_that_differs_slightly_is_caught(monkeypatch):
    forms.check_pair(zoo.entry(PLANT), _pair("favor_attention"))  # sound as it is
    pair = _plant(monkeypatch, lambda ref: lambda *a, **kw: ref(*a, **kw) * (1 + 1e-8))
    with pytest.raises(ContractError, match="output differs"):
        forms.check_pair(zoo.entry(PLANT), pair)


def test_a_reference_whose_gradient_differs_is_caught(monkeypatch):
    """Same values, different gradient: a detached term changes only the backward pass."""
    pair = _plant(monkeypatch, lambda ref: lambda q, k, v, *a, **kw: (
        ref(q, k, v, *a, **kw) + 1e-6 * (q.sum() - q.sum().detach())))
    with pytest.raises(ContractError, match="grad"):
        forms.check_pair(zoo.entry(PLANT), pair)


def test_a_causal_only_difference_is_caught(monkeypatch):
    pair = _plant(monkeypatch, lambda ref: lambda q, k, v, w, mask=None, *, causal=False, chunk=64: (
        ref(q, k, v, w, mask, causal=False, chunk=chunk)))
    with pytest.raises(ContractError, match="causal"):
        forms.check_pair(zoo.entry(PLANT), pair)


def test_a_fast_function_the_layer_does_not_reach_by_name_is_caught(monkeypatch):
    """A layer holding its own handle on the fast function could not be checked: say so."""
    pair = _pair("favor_attention")
    module = importlib.import_module(pair.module)
    fast = getattr(module, pair.name)
    cls = zoo.load(PLANT)
    monkeypatch.setattr(cls, "attend", lambda self, q, k, v, mask=None, _f=fast: _f(
        q, k, v, self.projection, mask, causal=self.causal, chunk=self.chunk))
    with pytest.raises(ContractError, match="never calls"):
        forms.check_pair(zoo.entry(PLANT), pair)


def test_every_binding_is_replaced(monkeypatch):
    """A module that imported the fast function under another name is patched too."""
    pair = _pair("favor_attention")
    module = importlib.import_module(pair.module)
    other = importlib.import_module("zoo.core.linear")
    monkeypatch.setattr(other, "alias_of_fast", getattr(module, pair.name), raising=False)
    with forms.replaced(pair) as calls:
        other.alias_of_fast(*[torch.randn(1, 1, 3, 4, dtype=torch.float64) for _ in range(3)],
                            torch.randn(1, 2, 4, dtype=torch.float64))
    assert calls[0] == 1

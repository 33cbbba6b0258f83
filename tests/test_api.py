"""The public API: names, entry, load, create, UnknownEntry, keyword errors."""

import dataclasses

import pytest
import torch

import zoo
from zoo.catalog import FAMILIES


def test_names_filters():
    all_ids = zoo.names()
    assert all_ids == sorted(all_ids) and "efficient-attention" in all_ids
    assert zoo.names("*-attention") == [i for i in all_ids if i.endswith("-attention")]
    exact = zoo.names(family="exact")
    assert exact and all(zoo.entry(i).family == "exact" for i in exact)
    causal = zoo.names(autoregressive=True)
    assert "linear-transformer" in causal and "efficient-attention" not in causal
    assert set(zoo.names(autoregressive=False)) == set(all_ids) - set(causal)


def test_entry_card():
    e = zoo.entry("efficient-attention")
    assert e.arxiv == "1812.01243" and e.family in FAMILIES and e.scaling == {"time": 1,
                                                                               "memory": 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.id = "other"
    assert zoo.entry("efficient_attention") is e  # underscores, as in hub names, resolve


def test_unknown_entry_lists_close_matches():
    with pytest.raises(zoo.UnknownEntry, match="did you mean 'efficient-attention'"):
        zoo.entry("eficient-attention")
    assert issubclass(zoo.UnknownEntry, LookupError)
    with pytest.raises(zoo.UnknownEntry):
        zoo.create("no-such-thing-at-all")


def test_create_rejects_unknown_keyword_listing_accepted():
    with pytest.raises(TypeError, match=r"takes no keyword 'hedas' \(did you mean 'heads'\?\); "
                                        r"accepted: dim, heads"):
        zoo.create("softmax-attention", dim=64, hedas=4)


@pytest.mark.parametrize("name", zoo.names())
def test_create_with_dim_only(name):
    layer = zoo.create(name, dim=64)
    assert isinstance(layer, zoo.load(name)) and isinstance(layer, torch.nn.Module)

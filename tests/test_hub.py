"""torch.hub.load works for every entry from the repository directory."""

from pathlib import Path

import pytest
import torch

import zoo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", zoo.names())
def test_hub_load(name):
    layer = torch.hub.load(str(ROOT), name.replace("-", "_"), source="local", dim=32,
                           **zoo.entry(name).hparams)
    assert type(layer) is zoo.load(name)

import pytest
import torch

import zoo


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def entry_params(predicate=lambda e: True):
    """pytest params over catalogue entries, with the id as the test id."""
    return [pytest.param(zoo.entry(i), id=i) for i in zoo.names() if predicate(zoo.entry(i))]

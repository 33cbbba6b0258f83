"""The contract battery: every check of zoo.verify.contract on every catalogue entry it applies to.

A new catalogue entry is picked up here with no new test code; each runs with its own `hparams`.
"""

import pytest

import zoo
from zoo.verify.contract import CHECKS, factory

CASES = [
    pytest.param(name, i, id=f"{i}-{name}")
    for i in zoo.names()
    for name, (_, applies) in CHECKS.items()
    if applies(zoo.entry(i))
]


@pytest.mark.parametrize("check, name", CASES)
def test_contract(check, name):
    entry = zoo.entry(name)
    run, _ = CHECKS[check]
    run(entry, factory(entry))

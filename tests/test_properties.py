"""Bad input, tried systematically with hypothesis for every entry: shapes, dtypes, lengths,
masks and hyper-parameters. The result is either a finite output of the input's shape and dtype,
or a ValueError / TypeError that names the problem; never another exception from deep inside
torch, never NaN or inf from finite input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoo
from zoo.verify.contract import DIM

CLEAR = (ValueError, TypeError)


def _mutations(hparams: dict):
    """Hyper-parameter sets near the catalogue's: each int nudged to odd, tiny or invalid values."""
    options = [dict(hparams)]
    for key, value in hparams.items():
        if isinstance(value, bool):
            options.append({**hparams, key: not value})
        elif isinstance(value, int):
            options += [{**hparams, key: v} for v in (0, -1, 1, 3, value + 1)]
    options += [{**hparams, "heads": h} for h in (1, 3, 5)]
    return options


@pytest.mark.parametrize("name", zoo.names())
def test_bad_input_gives_a_clear_error_or_a_finite_output(name):
    e = zoo.entry(name)

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def run(data):
        kwargs = data.draw(st.sampled_from(_mutations(dict(e.hparams))), label="hparams")
        if e.input == "sequence":
            kwargs["causal"] = data.draw(st.booleans(), label="causal")
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
        width = data.draw(st.sampled_from([DIM, DIM, DIM, DIM - 1]), label="width")
        b = data.draw(st.integers(1, 3), label="batch")
        try:
            torch.manual_seed(0)
            layer = zoo.create(name, dim=DIM, **kwargs).eval().to(dtype)
        except CLEAR as err:
            assert str(err), "an error without a message"
            return
        mask = None
        if e.input == "sequence":
            n = data.draw(st.integers(1, 48), label="n")
            x = torch.randn(b, n, width).to(dtype) * data.draw(st.sampled_from([1.0, 30.0]))
            if data.draw(st.booleans(), label="with mask"):
                mask = torch.rand(b, n) > data.draw(st.sampled_from([0.0, 0.5, 1.0]))
                if data.draw(st.booleans(), label="bad mask"):
                    mask = data.draw(st.sampled_from([mask.float(), mask[:, :-1] if n > 1
                                                      else mask[:0], mask[0]]))
        else:
            y, xx = data.draw(st.integers(1, 9), label="y"), data.draw(st.integers(1, 9), label="x")
            x = torch.randn(b, width, y, xx).to(dtype)
        try:
            with torch.no_grad():
                out = layer(x) if mask is None else layer(x, mask=mask)
        except CLEAR as err:
            assert str(err), "an error without a message"
            return
        assert width == DIM, f"input of width {width} was accepted"
        assert isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == dtype
        assert torch.isfinite(out).all(), "NaN or inf from finite input"

    run()


def test_dtype_mismatch_is_a_clear_error():
    layer = zoo.create("softmax-attention", dim=DIM)
    with pytest.raises(ValueError, match="x has dtype torch.float64 but the layer's parameters are "
                                         "torch.float32"):
        layer(torch.randn(1, 3, DIM, dtype=torch.float64))

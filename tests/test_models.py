"""zoo.models: shapes for sequence and grid-laid image entries, causality of causal models,
hyper-parameters passed through with the registry's errors, and clear errors for bad input."""

import pytest
import torch

import zoo
from zoo.models import SequenceModel


def test_sequence_model_shapes_and_the_tied_head():
    model = SequenceModel("linear-transformer", vocab=50, dim=32, depth=2)
    tokens = torch.randint(0, 50, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, 50)
    assert model.causal
    # the head is the embedding: a token's own embedding scores highest for a zero-depth read-out
    assert model.embed.weight.data_ptr() == dict(model.named_parameters())["embed.weight"].data_ptr()
    at = torch.zeros(3, 17, dtype=torch.bool)
    at[0, 3] = at[2, 16] = True
    picked = model(tokens, at=at)
    assert picked.shape == (2, 50)
    assert torch.allclose(picked, logits[at], atol=1e-5)


def test_causal_model_outputs_ignore_later_tokens():
    torch.manual_seed(0)
    model = SequenceModel("performer", vocab=40, dim=32, conv=4, features=16).eval()
    a = torch.randint(0, 40, (1, 20))
    b = a.clone()
    b[0, 12:] = (b[0, 12:] + 1) % 40
    assert torch.allclose(model(a)[0, :12], model(b)[0, :12], atol=1e-5)
    assert not torch.allclose(model(a)[0, 12:], model(b)[0, 12:], atol=1e-5)


def test_bidirectional_entries_run_bidirectionally():
    model = SequenceModel("nystromformer", vocab=40, dim=32, landmarks=4).eval()
    assert not model.causal
    a = torch.randint(0, 40, (1, 20))
    b = a.clone()
    b[0, -1] = (b[0, -1] + 1) % 40
    assert not torch.allclose(model(a)[0, 0], model(b)[0, 0], atol=1e-6)


@pytest.mark.parametrize("attention", ["cbam", "non-local"])
def test_image_entries_mix_a_square_grid_of_tokens(attention):
    model = SequenceModel(attention, vocab=30, dim=16, max_len=50).eval()
    tokens = torch.randint(0, 30, (2, 10))  # laid out on a 4 x 4 grid, six blanks
    assert model(tokens).shape == (2, 10, 30)
    b = tokens.clone()
    b[0, -1] = (b[0, -1] + 1) % 30
    moved = (model(tokens)[0, 0] - model(b)[0, 0]).abs().max()
    # both mix positions: non-local by attention, cbam through its pooled channel gate
    assert moved > 1e-7
    assert torch.equal(model(tokens)[1], model(b)[1])  # and never across the batch


def test_hyper_parameters_pass_through_with_the_registrys_errors():
    model = SequenceModel("performer", vocab=20, dim=32, features=24)
    layer = model.blocks[0].layer
    assert layer.features == 24 and layer.projection.shape[1] == 24
    assert layer.heads == 2 and layer.causal  # the model's heads, and causal for a causal entry
    with pytest.raises(TypeError, match="featurs"):
        SequenceModel("performer", vocab=20, dim=32, featurs=24)
    with pytest.raises(zoo.UnknownEntry, match="performer"):
        SequenceModel("performr", vocab=20, dim=32)


def test_causal_true_refuses_a_bidirectional_entry_naming_the_alternatives():
    with pytest.raises(ValueError, match="not autoregressive.*linear-transformer"):
        SequenceModel("nystromformer", vocab=20, dim=32, causal=True)


def test_padding_mask_reaches_the_entry():
    torch.manual_seed(0)
    model = SequenceModel("softmax-attention", vocab=30, dim=32, causal=False).eval()
    tokens = torch.randint(1, 30, (1, 12))
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, 8:] = False
    other = tokens.clone()
    other[0, 8:] = 0
    assert torch.allclose(model(tokens, mask)[0, :8], model(other, mask)[0, :8], atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.randint(0, 20, (2, 5)).float()), "int64"),
    (lambda m: m(torch.randint(0, 20, (2, 70))), "outside 1 .. max_len=64"),
    (lambda m: m(torch.full((1, 5), 20)), r"0 \.\. 19"),
    (lambda m: m(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)), "mask"),
])
def test_bad_input_is_refused_clearly(call, message):
    model = SequenceModel("softmax-attention", vocab=20, dim=32, max_len=64)
    with pytest.raises(ValueError, match=message):
        call(model)


def test_generate_equals_rerunning_the_model_on_the_growing_prefix():
    torch.manual_seed(0)
    model = SequenceModel("softmax-attention", vocab=30, dim=32, conv=3).eval()
    prompt = torch.randint(0, 30, (2, 6))
    want = prompt
    for _ in range(5):
        want = torch.cat([want, model(want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(prompt, 5), want)
    with pytest.raises(ValueError, match="causal"):
        SequenceModel("nystromformer", vocab=30, dim=32).generate(prompt, 2)

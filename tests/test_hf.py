"""zoo.hf: entries swapped into, and registered with, small random GPT-2, BERT, RoBERTa and ViT models.

No download: every model is built here from a tiny config (2 layers, width 32, 2 heads, vocabulary
100). The oracle is the model itself: swapping in softmax attention (or an entry at its
`exact_when`) must reproduce the original outputs in float64 to 1e-10.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="zoo.hf needs the optional extra hf: pip install -e '.[hf]'")

from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
    ViTConfig,
    ViTForImageClassification,
)

import zoo  # noqa: E402
import zoo.hf  # noqa: E402
from zoo.hf import ZooAttention, key_padding  # noqa: E402

LAYERS, WIDTH, HEADS, VOCAB, N = 2, 32, 2, 100, 16
PAD = {"gpt2": 0, "bert": 0, "roberta": 1}  # RoBERTa derives positions from its padding id 1
SEQUENCE = [i for i in zoo.names() if zoo.entry(i).input == "sequence"]
AUTOREGRESSIVE = [i for i in SEQUENCE if zoo.entry(i).autoregressive]


def config(kind: str, attn_implementation: str | None = None):
    impl = {"attn_implementation": attn_implementation} if attn_implementation else {}
    text = dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS,
                intermediate_size=2 * WIDTH, vocab_size=VOCAB, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, **impl)
    if kind == "gpt2":
        return GPT2Config(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                          eos_token_id=0, **impl)
    if kind == "bert":
        return BertConfig(max_position_embeddings=64, **text)
    if kind == "roberta":
        return RobertaConfig(max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                             eos_token_id=2, **text)
    return ViTConfig(image_size=8, patch_size=2, num_channels=3, num_labels=3,
                     **{k: v for k, v in text.items() if k != "vocab_size"})


HEADED = {"gpt2": GPT2LMHeadModel, "bert": BertForMaskedLM, "roberta": RobertaForMaskedLM,
          "vit": ViTForImageClassification}


def randomise(m: nn.Module) -> nn.Module:
    """transformers starts biases at zero and norms at one: noise on every parameter, so that a
    bias lost on the way, or a norm skipped, shows in the output."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def model(kind: str, dtype=torch.float32, attn_implementation: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    return randomise(HEADED[kind](config(kind, attn_implementation))).to(dtype)


def batch(kind: str, n: int = N, dtype=torch.float32, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":  # 8 x 8 pixels in 2 x 2 patches: 16 patches and the class token
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g, dtype=dtype),
                "labels": torch.tensor([0, 2])}
    ids = torch.randint(3, VOCAB, (2, n), generator=g)
    return {"input_ids": ids, "labels": ids}


def hparams(name: str, **extra) -> dict:
    """The catalogue's test hyper-parameters, as `zoo.verify.contract.factory` uses them; the
    model sets the number of heads."""
    return {k: v for k, v in {**zoo.entry(name).hparams, **extra}.items() if k != "heads"}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def zoo_layers(m: nn.Module) -> list[ZooAttention]:
    return [mod for mod in m.modules() if isinstance(mod, ZooAttention)]


ORIGINAL = (transformers.models.gpt2.modeling_gpt2.GPT2Attention,
            transformers.models.bert.modeling_bert.BertSelfAttention,
            transformers.models.roberta.modeling_roberta.RobertaSelfAttention,
            transformers.models.vit.modeling_vit.ViTAttention)


# --- the oracle: softmax attention swapped in is the model itself ------------------------------

def padded(kind: str, side: str, lengths=(12, 7), seed: int = 2):
    """A padded batch of token sequences, the real tokens of each, and the kwargs the model
    needs (GPT-2 and BERT count positions from the first real token, as generation does)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), PAD[kind])
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    singles = []
    for row, length in enumerate(lengths):
        tokens = torch.randint(3, VOCAB, (length,), generator=g)
        where = slice(n - length, n) if side == "left" else slice(0, length)
        ids[row, where], mask[row, where] = tokens, 1
        singles.append((tokens, where))
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if kind != "roberta":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return kwargs, singles


def swap_error(kind: str, name: str = "softmax-attention", n: int = N, padding: bool = True,
               **hp) -> float:
    """Relative difference between a float64 model and the same model with `name` swapped in,
    on a plain batch and (text models, `padding`) on the real positions of left- and
    right-padded batches."""
    original = model(kind, torch.float64).eval()
    swapped = zoo.hf.swap(copy.deepcopy(original), name, **hp)
    assert len(zoo_layers(swapped)) == LAYERS
    assert not any(isinstance(mod, ORIGINAL) for mod in swapped.modules())
    inputs = batch(kind, n=n, dtype=torch.float64)
    inputs.pop("labels")
    worst = rel_error(swapped(**inputs).logits, original(**inputs).logits)
    if kind != "vit" and padding:
        for side in ("left", "right"):
            kwargs, singles = padded(kind, side)
            a, b = swapped(**kwargs).logits, original(**kwargs).logits
            for row, (_, where) in enumerate(singles):
                worst = max(worst, rel_error(a[row, where], b[row, where]))
    return worst


@pytest.mark.parametrize("kind", ["gpt2", "bert", "roberta", "vit"])
def test_softmax_swap_reproduces_the_model(kind):
    assert swap_error(kind) <= 1e-10


@pytest.mark.parametrize("kind", ["gpt2", "bert", "vit"])
def test_the_oracle_bites_when_the_biases_are_dropped(monkeypatch, kind):
    def without_bias(weight, bias):  # the planted defect: biases lost in the copy
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            out.weight.copy_(weight)
        return out

    monkeypatch.setattr(zoo.hf, "_linear", without_bias)
    assert swap_error(kind) > 1e-4


EXACT = [i for i in SEQUENCE if zoo.entry(i).exact_when is not None and zoo.hf.carries_weights(i)]


@pytest.mark.parametrize("kind, name", [
    pytest.param(kind, i, id=f"{kind}-{i}") for i in EXACT for kind in ("gpt2", "bert")
    if kind == "bert" or zoo.entry(i).autoregressive])
def test_entry_at_its_exact_limit_reproduces_the_model(kind, name):
    """The weights carry over into every shell entry, not only softmax: at `exact_when` (n = 37,
    as the catalogue's exact claim runs) the swapped model equals the original."""
    exact = hparams(name, **zoo.entry(name).exact_when)
    assert swap_error(kind, name, n=37, padding=False, **exact) <= 1e-10


# --- every compatible entry runs and trains in each model --------------------------------------

def later_token_leak(m: nn.Module, t: int = 10) -> tuple[float, float]:
    """(largest change of an output before position t, largest change at or after it) when the
    input token at t is replaced."""
    ids = batch("gpt2")["input_ids"]
    other = ids.clone()
    other[:, t] = (ids[:, t] + 1) % VOCAB
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, m(input_ids=other).logits
    scale = a.abs().max()
    return ((a - b)[:, :t].abs().max() / scale).item(), ((a - b)[:, t:].abs().max() / scale).item()


CASES = ([pytest.param("gpt2", i, id=f"gpt2-{i}") for i in AUTOREGRESSIVE]
         + [pytest.param("bert", i, id=f"bert-{i}") for i in SEQUENCE]
         + [pytest.param("vit", i, id=f"vit-{i}") for i in SEQUENCE])


def check_swapped_model_trains(kind: str, name: str) -> None:
    """The swapped model runs (shape, finite), its zoo layers take part in training (every
    parameter gets a finite gradient, not all zero), four Adam steps lower the loss, and in
    GPT-2 no output depends on a later token."""
    m = zoo.hf.swap(model(kind), name, **hparams(name)).train()
    layers = zoo_layers(m)
    assert len(layers) == LAYERS and all(z.entry_id == name for z in layers)
    assert not any(isinstance(mod, ORIGINAL) for mod in m.modules())
    inputs = batch(kind)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for step in range(4):
        out = m(**inputs)
        if step == 0:
            expected = (2, 3) if kind == "vit" else (2, N, VOCAB)
            assert out.logits.shape == expected and torch.isfinite(out.logits).all()
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            grads = [p.grad for z in layers for p in z.parameters()]
            assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), \
                "a parameter of a swapped layer got no finite gradient"
            assert sum(g.abs().sum() for g in grads) > 0, "the swapped layers' gradients are all zero"
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses
    if kind == "gpt2":
        before, after = later_token_leak(m.eval())
        assert before <= 1e-5 and after > 1e-3, f"looks ahead: {before:.3g} before, {after:.3g} after"


@pytest.mark.parametrize("kind, name", CASES)
def test_swapped_model_runs_and_trains(kind, name):
    check_swapped_model_trains(kind, name)


def test_the_training_check_bites_on_a_layer_cut_from_the_graph(monkeypatch):
    forward = ZooAttention.forward

    def detached(self, *args, **kwargs):
        out, weights = forward(self, *args, **kwargs)
        return out.detach(), weights

    monkeypatch.setattr(ZooAttention, "forward", detached)
    with pytest.raises(AssertionError, match="no finite gradient"):
        check_swapped_model_trains("bert", "performer")


def test_the_look_ahead_check_bites_on_a_swap_built_non_causal(monkeypatch):
    create = zoo.hf.create
    monkeypatch.setattr(zoo.hf, "create", lambda name, **kw: create(name, **{**kw, "causal": False}))
    with pytest.raises(AssertionError, match="looks ahead"):
        check_swapped_model_trains("gpt2", "performer")


# --- padded batches equal their unpadded examples ---------------------------------------------

def padding_error(kind: str, name: str, side: str, attn_implementation: str | None = None) -> float:
    m = zoo.hf.swap(model(kind, torch.float64, attn_implementation).eval(), name, **hparams(name))
    kwargs, singles = padded(kind, side)
    out = m(**kwargs).logits
    return max(rel_error(out[row, where], m(input_ids=tokens[None]).logits[0])
               for row, (tokens, where) in enumerate(singles))


# Entries whose output at a token depends on the other tokens' contents only, not on where they
# sit: so moving a sequence right by left padding, or appending pads, leaves its outputs alone.
# (Block, window and landmark entries see other neighbours once padded; the contract battery
# checks that they ignore padded keys.)
POSITION_FREE = ["softmax-attention", "linear-transformer", "performer", "efficient-attention"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind, name", [
    pytest.param(kind, i, id=f"{kind}-{i}") for i in POSITION_FREE for kind in ("gpt2", "bert", "roberta")
    if kind != "gpt2" or zoo.entry(i).autoregressive])
def test_padded_batch_equals_its_unpadded_examples(kind, name, side):
    assert padding_error(kind, name, side) <= 1e-10


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_padding_from_the_eager_mask(kind):
    """Eager attention hands its modules an additive float mask instead of SDPA's bool one."""
    assert padding_error(kind, "softmax-attention", "left", "eager") <= 1e-10


def test_the_padding_check_bites_when_the_mask_is_dropped(monkeypatch):
    monkeypatch.setattr(zoo.hf, "key_padding", lambda mask, b, n, *, causal: None)
    assert padding_error("bert", "softmax-attention", "right") > 1e-4


def test_key_padding_reads_the_masks_transformers_builds():
    pad = torch.tensor([[False, True, True], [True, True, True]])
    assert torch.equal(key_padding(torch.tensor([[0, 1, 1], [1, 1, 0]]), 2, 3, causal=False),
                       torch.tensor([[False, True, True], [True, True, False]]))
    assert key_padding(torch.ones(2, 3, dtype=torch.long), 2, 3, causal=False) is None
    causal4d = pad[:, None, None, :] & torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(key_padding(causal4d, 2, 3, causal=True), pad)
    floor = torch.finfo(torch.float32).min
    additive = torch.where(causal4d, 0.0, floor)
    assert torch.equal(key_padding(additive, 2, 3, causal=True), pad)
    with pytest.raises(ValueError, match="not a causal padding mask"):
        key_padding(pad[:, None, None, :].expand(2, 1, 3, 3), 2, 3, causal=True)  # no triangle
    with pytest.raises(ValueError, match="not a padding mask"):
        key_padding(causal4d, 2, 3, causal=False)
    with pytest.raises(ValueError, match="bias"):
        key_padding(additive + 0.5, 2, 3, causal=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        key_padding(causal4d[..., :2, :], 2, 3, causal=True)


# --- what swap refuses ------------------------------------------------------------------------

def test_swap_refuses_image_entries():
    m = model("bert")
    with pytest.raises(ValueError, match="image entry.*softmax-attention"):
        zoo.hf.swap(m, "cbam")
    assert not zoo_layers(m)


def test_causal_model_refuses_a_non_autoregressive_entry_and_names_the_alternatives():
    m = model("gpt2")
    with pytest.raises(ValueError, match="no causal form") as err:
        zoo.hf.swap(m, "bigbird")
    assert "performer" in str(err.value) and "linear-transformer" in str(err.value)
    assert "linformer" not in str(err.value)
    assert not zoo_layers(m)  # nothing swapped before the refusal


def test_swap_takes_sizes_from_the_model():
    with pytest.raises(TypeError, match="heads"):
        zoo.hf.swap(model("bert"), "performer", heads=4)


def test_swap_needs_a_model_it_knows():
    with pytest.raises(ValueError, match="no self-attention module"):
        zoo.hf.swap(nn.Sequential(nn.Linear(4, 4)), "performer")


def test_swapped_layers_keep_no_cache():
    m = zoo.hf.swap(model("gpt2"), "performer", **hparams("performer"))
    assert m.config.use_cache is False and m.generation_config.use_cache is False
    with pytest.raises(ValueError, match="use_cache=False"):
        m(input_ids=batch("gpt2")["input_ids"], use_cache=True)


def test_swapped_softmax_generates_what_the_model_generates():
    """The original decodes with its key/value cache, the swap recomputes the prefix."""
    original = model("gpt2", torch.float64).eval()
    swapped = zoo.hf.swap(copy.deepcopy(original), "softmax-attention")
    prompt = batch("gpt2")["input_ids"][:, :6]
    expected = original.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(swapped.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       expected)


def test_padding_into_an_entry_without_masking_raises():
    m = zoo.hf.swap(model("bert"), "compressive-transformer", **hparams("compressive-transformer"))
    kwargs, _ = padded("bert", "right")
    with pytest.raises(ValueError, match="masking: false"):
        m(**kwargs)


def test_which_entries_carry_weights():
    assert {i for i in ["softmax-attention", "performer", "linformer", "attention-free-transformer"]
            if zoo.hf.carries_weights(i)} == {"softmax-attention", "performer", "linformer",
                                              "attention-free-transformer"}
    # Shared-QK, multi-query keys, own projections: their forward is not the shell's.
    assert not any(zoo.hf.carries_weights(i) for i in ["reformer", "lambda-networks",
                                                         "product-key-memory", "fastformer", "cbam"])


# --- register: the attention-implementation registry ------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "bert", "roberta", "vit"])
def test_registered_softmax_reproduces_the_model(kind):
    key = zoo.hf.register("softmax-attention")
    assert key == "zoo-softmax-attention"
    torch.manual_seed(0)
    original = randomise(AutoModel.from_config(config(kind))).double().eval()
    registered = AutoModel.from_config(config(kind), attn_implementation=key).double().eval()
    assert registered.config._attn_implementation == key
    registered.load_state_dict(original.state_dict())
    inputs = batch(kind, dtype=torch.float64)
    inputs.pop("labels")
    cases = [(inputs, None)]
    if kind != "vit":
        kwargs, singles = padded(kind, "left")
        cases.append((kwargs, singles))
    for kwargs, singles in cases:
        a, b = registered(**kwargs).last_hidden_state, original(**kwargs).last_hidden_state
        rows = [(slice(None), slice(None))] if singles is None else list(enumerate(w for _, w in singles))
        for row, where in rows:
            assert rel_error(a[row, where], b[row, where]) <= 1e-10


REGISTRABLE_CAUSAL = [i for i in AUTOREGRESSIVE if zoo.hf.registrable(i, **hparams(i))]


def test_registrable_entries_are_the_parameter_free_shell_entries():
    assert {"softmax-attention", "performer", "linear-transformer"} <= set(REGISTRABLE_CAUSAL)
    # linformer owns projections, random-feature-attention its sigma, reformer its forward.
    assert not any(zoo.hf.registrable(i) for i in ["linformer", "random-feature-attention", "reformer"])


def registered_gpt2(name: str) -> nn.Module:
    key = zoo.hf.register(name, **hparams(name))
    torch.manual_seed(0)
    return GPT2LMHeadModel(config("gpt2", key)).eval()


@pytest.mark.parametrize("name", REGISTRABLE_CAUSAL)
def test_registered_gpt2_never_looks_ahead(name):
    before, after = later_token_leak(registered_gpt2(name))
    assert before <= 1e-5 and after > 1e-3, (before, after)


def test_the_look_ahead_check_bites_on_a_non_causal_layer():
    m = registered_gpt2("performer")
    for mod in m.modules():
        if isinstance(mod, ORIGINAL[0]):
            mod.is_causal = False  # the planted defect: the zoo layer is then built non-causal
    before, _ = later_token_leak(m)
    assert before > 1e-3


def test_registered_attention_refuses_a_cache():
    m = registered_gpt2("performer")
    ids = batch("gpt2")["input_ids"]
    out = m(input_ids=ids[:, :-1], use_cache=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        m(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)


def test_register_refuses_entries_with_parameters_and_image_entries():
    with pytest.raises(ValueError, match="swap"):
        zoo.hf.register("linformer")
    with pytest.raises(ValueError, match="image entry"):
        zoo.hf.register("cbam")
    zoo.hf.register("bigbird")
    with pytest.raises(ValueError, match="no causal form"):
        GPT2LMHeadModel(config("gpt2", "zoo-bigbird"))(input_ids=batch("gpt2")["input_ids"])

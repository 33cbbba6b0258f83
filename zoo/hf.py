"""Put a zoo entry into a Hugging Face `transformers` model (the optional extra `hf`).

Two routes, both documented on the site's "Use it in your model" page:

- `swap(model, id, **hparams)` replaces every self-attention module of a GPT-2, BERT, RoBERTa or
  ViT model, in place, by the entry's layer (`zoo.create(id, dim=..., heads=..., causal=...)`).
  Where the layer is the shared multi-head shell around `attend` (`carries_weights(id)`), the
  model's own query, key, value and output weights and biases are copied into the layer's
  `to_qkv` and `to_out`, so `swap(model, "softmax-attention")` computes what the model computed.
  Every other sequence entry replaces the attention block as a whole layer with fresh weights.
- `register(id, **hparams)` adds `"zoo-<id>"` to transformers' attention-implementation registry
  for entries whose only parameters are the shell's (`registrable(id)`): the model keeps its own
  projections and calls the entry's `attend` on its q, k, v.

The model's `attention_mask` (0/1, padding on either side) reaches the entry as its key-padding
mask (bool, True = real token); a causal model (GPT-2) builds the entry with `causal=True`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
    )
    from transformers.models.bert.modeling_bert import BertSelfAttention
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    from transformers.models.roberta.modeling_roberta import RobertaSelfAttention
    from transformers.models.vit.modeling_vit import ViTAttention
except ImportError as err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "zoo.hf needs Hugging Face transformers, which is an optional extra of attention-zoo: "
        "pip install attention-zoo[hf]  (or, in a checkout, pip install -e '.[hf]'). "
        f"The import failed with: {err}"
    ) from err

from zoo.core.shell import MultiHead
from zoo.registry import create, entry, load, names

__all__ = ["ZooAttention", "carries_weights", "key_padding", "register", "registrable", "swap"]

SUPPORTED = "GPT-2, BERT, RoBERTa and ViT"
# The keywords the model decides: passing them to `swap` or `register` is an error.
FROM_MODEL = ("dim", "heads", "dim_head", "causal")


# --- which entries fit ------------------------------------------------------------------------

def carries_weights(name: str) -> bool:
    """Whether `swap` copies the model's q/k/v/output weights into `name`'s layer.

    True exactly when the layer is the shared shell with its forward unchanged, i.e. it computes
    `to_out(merge(attend(split(to_qkv(x)))))`: then the model's projections are the layer's.
    """
    cls = load(name)
    return (entry(name).input == "sequence" and issubclass(cls, MultiHead)
            and cls.forward is MultiHead.forward)


def registrable(name: str, **hparams: Any) -> bool:
    """Whether `register(name, **hparams)` accepts `name`: the layer carries weights and owns no
    parameter beyond the shell's `to_qkv` and `to_out` (buffers, such as random features, are fine)."""
    _check_keywords(hparams, "register")
    if not carries_weights(name):
        return False
    probe = create(name, dim=32, heads=2, **hparams)
    return all(p.split(".")[0] in ("to_qkv", "to_out") for p, _ in probe.named_parameters())


def _check_keywords(hparams: dict, where: str) -> None:
    given = [k for k in FROM_MODEL if k in hparams]
    if given:
        raise TypeError(f"zoo.hf.{where} takes {', '.join(FROM_MODEL)} from the model; "
                        f"do not pass {', '.join(given)}")


def _check_entry(name: str, causal: bool, where: str) -> str:
    e = entry(name)
    if e.input != "sequence":
        raise ValueError(
            f"zoo.hf.{where}: {e.id!r} is an image entry (input `(b, C, h, w)` feature maps); the "
            f"attention of {SUPPORTED} runs on token sequences `(b, n, dim)`. Sequence entries: "
            f"{', '.join(i for i in names() if entry(i).input == 'sequence')}")
    if causal and not e.autoregressive:
        raise ValueError(
            f"zoo.hf.{where}: {e.id!r} has no causal form (catalogue autoregressive: false), and this "
            f"model's self-attention is causal. Autoregressive entries: "
            f"{', '.join(i for i in names(autoregressive=True) if entry(i).input == 'sequence')}")
    return e.id


# --- masks ------------------------------------------------------------------------------------

def key_padding(mask: torch.Tensor | None, b: int, n: int, *, causal: bool) -> torch.Tensor | None:
    """The `(b, n)` bool key-padding mask (True = real) behind the mask a model passes to attention.

    Accepts what transformers gives attention modules: None, the 2D 0/1 `attention_mask`, or the
    4D `(b, 1, n, n)` mask it builds from it (bool for SDPA; 0 / the dtype's minimum for eager).
    A 4D mask must be exactly padding (and, for a causal model, the causal triangle): any other
    pattern (packed sequences, sliding windows, a custom bias) raises instead of being dropped.
    Returns None when every token is real.
    """
    if mask is None:
        return None
    if mask.ndim == 2:
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"zoo.hf: expected an attention mask of shape ({b}, {n}), "
                             f"got {tuple(mask.shape)}")
        pad = mask != 0
    elif mask.ndim == 4:
        if mask.shape[0] != b or mask.shape[-1] != n or mask.shape[-2] != n:
            raise ValueError(f"zoo.hf: expected a 4D attention mask ({b}, 1, {n}, {n}), got "
                             f"{tuple(mask.shape)} (a key/value cache is not supported: "
                             f"call the model with use_cache=False)")
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            allowed = mask == 0
            floor = torch.finfo(mask.dtype).min
            if not bool(((mask == 0) | (mask == floor)).all()):
                raise ValueError("zoo.hf: the model passed an additive attention mask with values "
                                 "other than 0 and the dtype's minimum (a bias); zoo entries take "
                                 "a key-padding mask only")
        # The last query row sees every earlier key, so it holds the padding of all of them.
        pad = allowed[:, 0, -1, :]
        expected = pad[:, None, None, :]
        if causal:
            expected = expected & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        if not torch.equal(allowed, expected.expand_as(allowed)):
            kind = "causal padding" if causal else "padding"
            raise ValueError(f"zoo.hf: the model's attention mask is not a {kind} mask (packed "
                             f"sequences, a sliding window or a custom 4D mask?); zoo entries take "
                             f"a key-padding mask only")
    else:
        raise ValueError(f"zoo.hf: expected an attention mask of 2 or 4 dimensions, got shape "
                         f"{tuple(mask.shape)}")
    return None if bool(pad.all()) else pad


# --- route 3a: swap ---------------------------------------------------------------------------

class ZooAttention(nn.Module):
    """A zoo layer where a transformers self-attention block was.

    Called like the module it replaces, it returns `(output, None)`: the output already passed
    through the output projection (the model's, for weight-carrying entries), and no attention
    weights (zoo layers do not form them).

    Args:
        layer: the zoo layer, `(b, n, dim) -> (b, n, dim)`.
        name: its catalogue id.
        causal: whether the replaced attention was causal (the layer was built with it).
        dropout: the replaced module's dropout after its output projection (GPT-2), or None.
    """

    def __init__(self, layer: nn.Module, name: str, *, causal: bool, dropout: nn.Module | None = None):
        super().__init__()
        self.layer, self.entry_id, self.causal = layer, name, causal
        self.masking = entry(name).masking
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                past_key_values=None, encoder_hidden_states: torch.Tensor | None = None, **kwargs):
        # kwargs: what transformers passes every attention module (use_cache, position_ids, ...).
        if encoder_hidden_states is not None:
            raise ValueError("zoo.hf: swapped modules are self-attention; cross-attention is not swapped")
        if past_key_values is not None:
            raise ValueError(f"zoo.hf: {self.entry_id} recomputes the whole sequence and keeps no "
                             f"key/value cache; call the model (or generate) with use_cache=False")
        b, n, _ = hidden_states.shape
        mask = key_padding(attention_mask, b, n, causal=self.causal)
        if mask is None:
            out = self.layer(hidden_states)
        elif not self.masking:
            raise ValueError(f"zoo.hf: {self.entry_id} does not honour a padding mask (catalogue "
                             f"masking: false), and this batch has padding; pass unpadded batches")
        else:
            out = self.layer(hidden_states, mask=mask)
        return self.dropout(out), None

    def extra_repr(self) -> str:
        return f"entry={self.entry_id!r}, causal={self.causal}"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _cat(*ts: torch.Tensor | None) -> torch.Tensor | None:
    if all(t is None for t in ts):
        return None
    ref = next(t for t in ts if t is not None)
    return torch.cat([torch.zeros_like(ref) if t is None else t for t in ts])


class _Site:
    """One self-attention module found in a model: where it hangs, and its weights in nn.Linear
    layout (`weight` is `(out, in)`)."""

    def __init__(self, parent: Any, attr: str, module: Any):
        self.parent, self.attr, self.module = parent, attr, module
        self.causal = bool(getattr(module, "is_causal", False))
        self.dropout: nn.Module | None = None
        self.out_owner: nn.Module | None = None  # BERT: the output projection lives in a sibling
        if isinstance(module, GPT2Attention):
            self.heads, self.dim_head = module.num_heads, module.head_dim
            self.qkv_weight, self.qkv_bias = module.c_attn.weight.T, module.c_attn.bias
            self.out_weight, self.out_bias = module.c_proj.weight.T, module.c_proj.bias
            self.dropout = module.resid_dropout
        elif isinstance(module, (BertSelfAttention, RobertaSelfAttention)):
            self.heads, self.dim_head = module.num_attention_heads, module.attention_head_size
            q, k, v = module.query, module.key, module.value
            dense = parent.output.dense
            self.out_owner = parent.output
            self.qkv_weight = torch.cat([q.weight, k.weight, v.weight])
            self.qkv_bias = _cat(q.bias, k.bias, v.bias)
            self.out_weight, self.out_bias = dense.weight, dense.bias
        else:  # ViTAttention
            self.heads, self.dim_head = module.num_attention_heads, module.head_dim
            q, k, v, o = module.q_proj, module.k_proj, module.v_proj, module.o_proj
            self.qkv_weight = torch.cat([q.weight, k.weight, v.weight])
            self.qkv_bias = _cat(q.bias, k.bias, v.bias)
            self.out_weight, self.out_bias = o.weight, o.bias
        self.scaling = float(module.scaling)
        self.dim = self.qkv_weight.shape[1]

    def build(self, name: str, hparams: dict) -> ZooAttention:
        sizes = {"dim": self.dim, "heads": self.heads}
        if self.dim_head * self.heads != self.dim:
            sizes["dim_head"] = self.dim_head
        ref = self.qkv_weight
        layer = create(name, **sizes, causal=self.causal, **hparams).to(device=ref.device,
                                                                        dtype=ref.dtype)
        if carries_weights(name):
            weight, bias = self.qkv_weight.detach().clone(), self.qkv_bias
            bias = None if bias is None else bias.detach().clone()
            # The model's score scale, folded into the queries (a no-op at the usual d ** -0.5).
            factor = self.scaling * math.sqrt(self.dim_head)
            if factor != 1.0:
                inner = self.heads * self.dim_head
                weight[:inner] *= factor
                if bias is not None:
                    bias[:inner] *= factor
            layer.to_qkv = _linear(weight, bias)
            layer.to_out = _linear(self.out_weight.detach(), None if self.out_bias is None
                                   else self.out_bias.detach())
        return ZooAttention(layer, name, causal=self.causal, dropout=self.dropout).train(
            self.module.training)

    def install(self, adapter: ZooAttention) -> None:
        setattr(self.parent, self.attr, adapter)
        if self.out_owner is not None:  # the adapter's output is already projected
            self.out_owner.dense = nn.Identity()


def _sites(model: nn.Module) -> list[_Site]:
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, GPT2Attention) and not child.is_cross_attention:
                found.append(_Site(parent, attr, child))
            elif isinstance(child, (BertSelfAttention, RobertaSelfAttention, ViTAttention)):
                found.append(_Site(parent, attr, child))
    return found


def swap(model: nn.Module, name: str, /, **hparams: Any) -> nn.Module:
    """Replace every self-attention module of `model` by `name`'s layer, in place; return `model`.

    Args:
        model: a transformers GPT-2, BERT, RoBERTa or ViT model (any head on top).
        name: a catalogue id of a sequence entry; for a causal model, an autoregressive one.
        **hparams: the entry's hyper-parameters; `dim`, `heads`, `dim_head` and `causal` come
            from the model.

    The model's `config.use_cache` (and `generation_config.use_cache`) is set to False: zoo
    layers keep no key/value cache, so `generate` recomputes the prefix at every step (a call
    with `use_cache=True` raises). Weight-carrying entries (`carries_weights(name)`) get the
    model's q/k/v and output weights and biases; their own parameters, and every parameter of
    the other entries, start from the entry's initialisation (drawn from torch's global
    generator, as `zoo.create` does).

    Raises:
        ValueError: for an image entry, a non-autoregressive entry in a causal model, or a model
            with no self-attention module this adapter knows.
    """
    _check_keywords(hparams, "swap")
    sites = _sites(model)
    if not sites:
        raise ValueError(f"zoo.hf.swap: found no self-attention module of {SUPPORTED} in "
                         f"{type(model).__name__} (already swapped, or another architecture)")
    name = _check_entry(name, any(s.causal for s in sites), "swap")
    adapters = [s.build(name, hparams) for s in sites]  # all built before the model changes
    for site, adapter in zip(sites, adapters, strict=True):
        site.install(adapter)
    # The swapped layers keep no key/value cache: forward and generate recompute the prefix.
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "use_cache", False):
            config.use_cache = False
    return model


# --- route 3b: register -----------------------------------------------------------------------

def _padding_only_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                       mask_function: Callable = causal_mask_function, attention_mask=None, **kwargs):
    """transformers' mask hook for a zoo implementation: the 2D key-padding mask, or None.

    The causal triangle is the entry's own (`causal=True`); a mask pattern beyond padding and
    causality (packed sequences, sliding windows, overlays) raises instead of being dropped.
    """
    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise ValueError("zoo.hf: this model asks for an attention pattern beyond padding and "
                         "causality (packed sequences, a sliding window or an overlay); zoo "
                         "attention implementations take a key-padding mask only")
    if q_offset or kv_offset or q_length != kv_length:
        raise ValueError("zoo.hf: zoo attention implementations recompute the whole sequence and "
                         "keep no key/value cache; call the model with use_cache=False")
    return prepare_padding_mask(attention_mask, kv_length, kv_offset)


def _attention_function(name: str, hparams: dict) -> Callable:
    layers: dict[tuple, MultiHead] = {}

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None,
                  dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
        """q, k `(b, h, n, d)`, v `(b, h, n, e)` -> `(b, n, h, e)`, as transformers expects.
        Attention-probability dropout does not apply (zoo layers form no probabilities)."""
        b, h, n, d = query.shape
        if key.shape[2] != n:
            raise ValueError(f"zoo.hf: zoo-{name} got {n} queries and {key.shape[2]} keys; it "
                             f"recomputes the whole sequence: call the model with use_cache=False")
        causal = bool(getattr(module, "is_causal", False))
        if causal and not entry(name).autoregressive:
            _check_entry(name, causal, "register")
        spec = (h, d, value.shape[-1], causal, query.dtype, query.device)
        if spec not in layers:
            layer = create(name, dim=h * d, heads=h, causal=causal, **hparams)
            assert isinstance(layer, MultiHead)  # registrable() checked it
            layers[spec] = layer.to(device=query.device, dtype=query.dtype)
        layer = layers[spec].train(module.training)
        mask = key_padding(attention_mask, b, n, causal=causal)
        if scaling is not None and scaling * math.sqrt(d) != 1.0:
            query = query * (scaling * math.sqrt(d))
        out = layer.attend(query, key, value, mask)
        return rearrange(out, "b h n e -> b n h e"), None

    return attention


def register(name: str, /, **hparams: Any) -> str:
    """Register `name` as the transformers attention implementation `"zoo-<id>"`; return that key.

    Then `AutoModel.from_config(config, attn_implementation="zoo-performer")` (or
    `model.set_attn_implementation("zoo-performer")`) runs the entry inside the model's own
    attention modules, on the model's q, k, v. Registering the same id again replaces the
    hyper-parameters. The model must run with `use_cache=False`.

    Raises:
        ValueError: for an entry that owns parameters beyond the shell's (use `swap`), or an
            image entry.
    """
    _check_keywords(hparams, "register")
    name = _check_entry(name, False, "register")
    if not registrable(name, **hparams):
        able = [i for i in names() if carries_weights(i) and registrable(i)]
        raise ValueError(f"zoo.hf.register: {name!r} has parameters of its own (or does not run "
                         f"as the shell's attend), which a registered attention function cannot "
                         f"own; use zoo.hf.swap. Registrable entries: {', '.join(able)}")
    key = f"zoo-{name}"
    AttentionInterface.register(key, _attention_function(name, dict(hparams)))
    AttentionMaskInterface.register(key, _padding_only_mask)
    return key

r"""Small models around any catalogue entry: what the recall benchmark trains, and what users can.

`SequenceModel(attention, vocab, dim)`: token embedding and learned positions, `depth` pre-norm
residual blocks with the entry as the token mixer (and an optional MLP), a final norm and a head
tied to the embedding. `(b, n)` token ids and an optional padding mask in, `(b, n, vocab)` logits
out. Causal entries run with `causal=True` (so the model is a language model and can `generate`);
the others run bidirectionally.

Image entries take part through the same model: the tokens are laid out row by row on the smallest
square grid that holds them (the rest filled with the blank token 0), embedded as channels, mixed
as a `(b, dim, side, side)` image, and read back per pixel. A channel-only module (cbam, gcnet)
mixes no two positions, and scores what that allows.

    >>> import zoo.models
    >>> model = zoo.models.SequenceModel("performer", vocab=256, dim=64, features=32)
    >>> model(torch.randint(0, 256, (2, 50))).shape
    torch.Size([2, 50, 256])

The recipe Zoology uses for Based (a short causal convolution before every mixer, `conv=4`) is an
option, the same for every entry.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.registry import accepted_keywords, create, entry


def mixer(attention: str, dim: int, *, heads: int, causal: bool | None, max_len: int,
          hparams: dict) -> tuple[nn.Module, bool]:
    """The entry's layer for a model of width `dim`, and whether it is causal.

    `heads` and `max_len` go to entries that take them (the caller's `hparams` win); `causal`
    None means the entry's own choice: causal where it is autoregressive.
    """
    e = entry(attention)
    from zoo.registry import load

    accepted = accepted_keywords(load(e.id))
    if causal is None:
        causal = e.autoregressive
    if causal and not e.autoregressive:
        raise ValueError(f"{e.id} is not autoregressive, so it cannot run causally; causal entries: "
                         f"{', '.join(n for n in _autoregressive())}")
    kwargs = dict(hparams)
    if "heads" in accepted:
        kwargs.setdefault("heads", heads)
    if "max_len" in accepted:
        kwargs.setdefault("max_len", max_len)
    if causal:
        kwargs["causal"] = True
    return create(e.id, dim=dim, **kwargs), bool(causal)


def _autoregressive() -> list[str]:
    from zoo.registry import names

    return names(autoregressive=True)


class ShortConv(nn.Module):
    """A depthwise causal convolution over the sequence, `(b, n, dim) -> (b, n, dim)`."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel: int = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(rearrange(x, "b n d -> b d n"), (self.kernel - 1, 0))
        return rearrange(self.conv(x), "b d n -> b n d")


class Block(nn.Module):
    """`x + mixer(norm(x))`, then `x + mlp(norm(x))` when the MLP is on; an optional short
    convolution runs on the normalised input before the mixer."""

    def __init__(self, layer: nn.Module, dim: int, *, image: bool, conv: int, mlp: int):
        super().__init__()
        self.image = image
        self.norm = nn.LayerNorm(dim)
        self.conv: ShortConv | None = ShortConv(dim, conv) if conv else None
        self.layer = layer
        self.mlp = None
        if mlp:
            self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp * dim), nn.GELU(),
                                     nn.Linear(mlp * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, side: int) -> torch.Tensor:
        h = self.norm(x)
        if self.conv is not None:
            h = self.conv(h)
        if self.image:
            grid = rearrange(h, "b (y x) d -> b d y x", y=side)
            h = rearrange(self.layer(grid), "b d y x -> b (y x) d")
        else:
            h = self.layer(h) if mask is None else self.layer(h, mask=mask)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(x)
        return x


class SequenceModel(nn.Module):
    """A small language model (causal entries) or encoder (the others) around one entry.

    Args:
        attention: catalogue id of the token mixer.
        vocab: vocabulary size.
        dim: model width.
        depth: number of residual blocks.
        heads: heads, for entries that take them.
        max_len: the longest sequence (learned positions; passed to entries that take `max_len`).
        mlp: hidden-width factor of an MLP after each mixer; 0 (the default, as Zoology's recall
            models) means none.
        conv: kernel of a short causal convolution before each mixer; 0 means none.
        causal: None (default) runs autoregressive entries causally and the others bidirectionally;
            True insists on causality (an error for other entries); False runs every entry
            bidirectionally.
        **hparams: the entry's own hyper-parameters (`features=64`, ...), checked by the registry.
    """

    def __init__(self, attention: str, *, vocab: int, dim: int = 64, depth: int = 2, heads: int = 2,
                 max_len: int = 1024, mlp: int = 0, conv: int = 0, causal: bool | None = None,
                 **hparams):
        super().__init__()
        for name, value in (("vocab", vocab), ("dim", dim), ("depth", depth), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SequenceModel: {name} must be a positive int, got {value!r}")
        for name, value in (("mlp", mlp), ("conv", conv)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SequenceModel: {name} must be a non-negative int, got {value!r}")
        e = entry(attention)
        self.attention, self.vocab, self.dim, self.max_len = e.id, vocab, dim, max_len
        self.image = e.input == "image"
        self.masking = e.masking and not self.image
        self.embed = nn.Embedding(vocab, dim)
        # an image model lays the tokens on a square grid, whose padding needs positions too
        positions = (math.isqrt(max_len - 1) + 1) ** 2 if self.image else max_len
        self.pos = nn.Parameter(torch.randn(positions, dim) * 0.02)
        blocks, causal_flags = [], []
        for _ in range(depth):
            layer, is_causal = mixer(e.id, dim, heads=heads, causal=causal, max_len=max_len,
                                     hparams=hparams)
            blocks.append(Block(layer, dim, image=self.image, conv=conv, mlp=mlp))
            causal_flags.append(is_causal)
        self.blocks = nn.ModuleList(blocks)
        self.causal = causal_flags[0]
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def _check(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.ndim != 2:
            raise ValueError(f"SequenceModel: expected tokens as an int64 (batch, length) tensor, got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        n = tokens.shape[1]
        if not 1 <= n <= self.max_len:
            raise ValueError(f"SequenceModel: length {n} is outside 1 .. max_len={self.max_len}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            raise ValueError(f"SequenceModel: token ids must lie in 0 .. {self.vocab - 1}, got "
                             f"{int(tokens.min())} .. {int(tokens.max())}")
        if mask is not None:
            if not self.masking:
                raise ValueError(f"SequenceModel: {self.attention} takes no padding mask")
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape):
                raise ValueError(f"SequenceModel: expected a bool mask of shape {tuple(tokens.shape)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")

    def hidden(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised states `(b, n, dim)`."""
        self._check(tokens, mask)
        n = tokens.shape[1]
        side = math.isqrt(n - 1) + 1 if self.image else 0
        if self.image and side * side > n:
            tokens = F.pad(tokens, (0, side * side - n), value=0)
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, mask, side)
        return self.norm(x[:, :n])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *,
                at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `(b, n, vocab)`; with `at` (a bool `(b, n)`), only those positions' logits,
        `(number of True, vocab)` in row-major order: the same loss at a fraction of the cost."""
        h = self.hidden(tokens, mask)
        if at is not None:
            if at.dtype != torch.bool or at.shape != tokens.shape:
                raise ValueError(f"SequenceModel: at must be a bool tensor of shape "
                                 f"{tuple(tokens.shape)}, got {at.dtype} {tuple(at.shape)}")
            h = h[at]
        return h @ self.embed.weight.T  # the head is tied to the embedding

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: `(b, n)` -> `(b, n + max_new_tokens)`.

        Uses each layer's `step` (a recurrent state or a cache) where every block has one, so a
        new token costs one step instead of a pass over the whole prefix; otherwise re-runs the
        model on the growing prefix. Both give the same tokens.
        """
        if not self.causal:
            raise ValueError(f"SequenceModel.generate needs a causal model; {self.attention} runs "
                             f"bidirectionally (causal entries: {', '.join(_autoregressive())})")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        self._check(tokens, None)
        if tokens.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"generate: {tokens.shape[1]} + {max_new_tokens} tokens exceed "
                             f"max_len={self.max_len}")
        if max_new_tokens == 0:
            return tokens
        if all(hasattr(b.layer, "step") for b in self.blocks):
            return self._generate_stepwise(tokens, max_new_tokens)
        out = tokens
        for _ in range(max_new_tokens):
            nxt = self(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
        return out

    def _generate_stepwise(self, tokens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        states: list = [None] * len(self.blocks)
        convs: list = [None] * len(self.blocks)
        out, chunk, start = tokens, tokens, 0
        for _ in range(max_new_tokens):
            x = self.embed(chunk) + self.pos[start: start + chunk.shape[1]]
            for i, block in enumerate(cast(list[Block], list(self.blocks))):
                h = block.norm(x)
                if block.conv is not None:
                    # the short convolution needs the last kernel - 1 normalised inputs
                    prev = convs[i] if convs[i] is not None else h[:, :0]
                    both = torch.cat([prev, h], dim=1)
                    h = block.conv(both)[:, -chunk.shape[1]:]
                    convs[i] = both[:, -(block.conv.kernel - 1):] if block.conv.kernel > 1 else both[:, :0]
                y, states[i] = cast(Any, block.layer).step(h, states[i])
                x = x + y
                if block.mlp is not None:
                    x = x + block.mlp(x)
            logits = self.norm(x[:, -1]) @ self.embed.weight.T
            nxt = logits.argmax(-1, keepdim=True)
            start += chunk.shape[1]
            out, chunk = torch.cat([out, nxt], dim=1), nxt
        return out

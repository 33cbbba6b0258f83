"""Probes: the catalogue's claims, measured. Tests, the CLI and the docs share them.

- `attention_matrix`: the effective `(h, n, n)` map of a kernel entry (feed `v = I`).
- `influence`: `(n, n)` norms of d y_i / d x_j for any layer; causality is zero above the diagonal.
- `scaling`: FLOPs (`torch.utils.flop_counter`) and the largest intermediate tensor of one forward
  over several n, and their exponents of n. Counts depend on shapes only, so they are the same on
  every run and machine.
- `approximation_error`: relative error against softmax attention as an entry's budget grows, and
  `approximation_baselines`: the errors of uniform averaging and of zeros on the same inputs.
- `decoding_scaling`: the decoding state's size and one token's step FLOPs after `L` tokens, and
  their exponents of `L`.

Each takes an `Entry` (or its id) and optionally a `make(**overrides)` factory, so a test can probe
a deliberately broken layer under the same claims.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from zoo.catalog import Entry
from zoo.core.softmax import softmax_attention
from zoo.registry import accepted_keywords, load
from zoo.registry import entry as _entry
from zoo.verify.contract import DIM, Make, factory, sample

SCALING_NS = (512, 1024, 2048)
SCALING_DIM = 32
SCALING_HEADS = 2


def has_attend(layer: nn.Module) -> bool:
    """Whether the layer defines its own `attend` (the shell's placeholder does not count)."""
    from zoo.core.shell import MultiHead

    method = getattr(type(layer), "attend", None)
    return callable(method) and method is not MultiHead.attend


def _resolve(e: Entry | str) -> Entry:
    return e if isinstance(e, Entry) else _entry(e)


def _heads_and_dim(layer: nn.Module) -> tuple[int, int]:
    heads = getattr(layer, "heads", 1)
    dim_head = getattr(layer, "dim_head", None) or getattr(layer, "inner_dim", None)
    if dim_head is None:
        raise ValueError(f"{type(layer).__name__} has no dim_head or inner_dim; pass q and k")
    return heads, dim_head


def qkv_for(layer: nn.Module, n: int, *, b: int = 1, seed: int = 0, dtype=torch.float64):
    """Random q, k, v `(b, h, n, d)` sized for the layer's heads."""
    h, d = _heads_and_dim(layer)
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def attention_matrix(layer: nn.Module, n: int = 16, *, q=None, k=None, mask=None,
                     seed: int = 0) -> torch.Tensor:
    """The effective map `A` with `attend(q, k, v) = A v`, read off by feeding `v = I`.

    Returns:
        `(h, n, n)` for the first batch element.
    """
    if not has_attend(layer):
        raise TypeError(f"{type(layer).__name__} is not a kernel entry (it has no attend())")
    if q is None or k is None:
        q, k, _ = qkv_for(layer, n, seed=seed, dtype=next(layer.parameters()).dtype)
    b, h, n = q.shape[:3]
    eye = torch.eye(n, dtype=q.dtype).expand(b, h, n, n)
    attend: Any = layer.attend
    with torch.no_grad():
        return attend(q, k, eye, mask)[0]


def influence(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`(n, n)` map of the norm of d y_i / d x_j over the first batch element.

    For images, positions are pixels in row-major order (n = y x).
    """
    x = x[:1].detach()
    image = x.ndim == 4

    def f(inp):
        return layer(inp) if mask is None else layer(inp, mask=mask[:1])

    jac = torch.autograd.functional.jacobian(f, x, vectorize=True)
    if image:  # (1, c, y, x, 1, c, y, x) -> (i, j) over pixels
        c, hh, ww = x.shape[1:]
        jac = jac.reshape(c, hh * ww, c, hh * ww).permute(1, 3, 0, 2)
    else:  # (1, n, dim, 1, n, dim)
        n, d = x.shape[1:]
        jac = jac.reshape(n, d, n, d).permute(0, 2, 1, 3)
    return jac.flatten(2).norm(dim=-1)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (views excluded), and the
    total count of elements all ops write: a cost measure that also sees index, sort and
    elementwise work, which the FLOP counter (matrix products only) does not."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.writes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        returns = func._schema.returns  # one per output, or one `Tensor[]` for a list of them
        for t, ret in zip(outs, returns * len(outs) if len(returns) == 1 else returns, strict=True):
            if not isinstance(t, torch.Tensor):
                continue
            # The schema says what an output is: new memory (no alias), a view of an input (expand,
            # slice, transpose: allocates and writes nothing, not counted) or an input written in
            # place (`cos_`, `out=`: counted as writes, allocates nothing).
            alias = ret.alias_info
            if alias is None:
                self.largest = max(self.largest, t.numel())
            if alias is None or alias.is_write:
                self.writes += t.numel()
        return out


@dataclass(frozen=True)
class Scaling:
    ns: tuple[int, ...]
    flops: tuple[int, ...]
    largest: tuple[int, ...]
    writes: tuple[int, ...] = ()

    @staticmethod
    def _exponent(ns, ys) -> float:
        # The local exponent over the top of the range: lower-order terms fade as n grows.
        return math.log(ys[-1] / ys[-2]) / math.log(ns[-1] / ns[-2])

    @property
    def time(self) -> float:
        return self._exponent(self.ns, self.flops)

    @property
    def memory(self) -> float:
        return self._exponent(self.ns, self.largest)

    @property
    def work(self) -> float:
        """Exponent of the elements written by all ops."""
        return self._exponent(self.ns, self.writes)


def scaling_input(e: Entry, n: int, dim: int) -> torch.Tensor:
    """`(1, n, dim)`, or a square image of about n pixels."""
    if e.input == "image":
        side = round(math.sqrt(n))
        return torch.randn(1, dim, side, side)
    return torch.randn(1, n, dim)


def scaling(e: Entry | str, ns=None, *, make: Make | None = None) -> Scaling:
    """FLOPs and largest intermediate of one forward at each n (float32, eval, no grad).

    `ns` defaults to the entry's `scaling.ns`, else `SCALING_NS`. A layer that takes `max_len` gets
    the largest n.
    """
    e = _resolve(e)
    ns = tuple(ns or e.scaling.get("ns") or SCALING_NS)
    make = make or factory(e, dim=SCALING_DIM)
    extra = {"max_len": max(ns)} if "max_len" in accepted_keywords(load(e.id)) else {}
    if "heads" in accepted_keywords(load(e.id)) and "heads" not in e.hparams:
        extra["heads"] = SCALING_HEADS
    flops, largest, writes = [], [], []
    for n in ns:
        layer = make(**extra).float()
        x = scaling_input(e, n, SCALING_DIM)
        counter, biggest = FlopCounterMode(display=False), _LargestTensor()
        with torch.no_grad(), counter, biggest:
            layer(x)
        flops.append(counter.get_total_flops())
        largest.append(biggest.largest)
        writes.append(biggest.writes)
    if e.input == "image":
        ns = tuple(round(math.sqrt(n)) ** 2 for n in ns)
    return Scaling(ns, tuple(flops), tuple(largest), tuple(writes))


DECODING_CONTEXTS = (1024, 2048)


@dataclass(frozen=True)
class DecodingScaling:
    """Size of the decoding state after `L` tokens, and FLOPs of the single-token step that brings the
    context to `L` tokens."""

    contexts: tuple[int, ...]
    state: tuple[int, ...]
    flops: tuple[int, ...]

    @staticmethod
    def _exponent(ls, ys) -> float:
        if ys[-1] == ys[-2]:  # constant, zero included
            return 0.0
        if ys[-2] == 0:
            return math.inf
        return math.log(ys[-1] / ys[-2]) / math.log(ls[-1] / ls[-2])

    @property
    def state_exponent(self) -> float:
        return self._exponent(self.contexts, self.state)

    @property
    def step_exponent(self) -> float:
        return self._exponent(self.contexts, self.flops)


def decoding_scaling(e: Entry | str, contexts=None, *, make: Make | None = None) -> DecodingScaling:
    """After a prompt of `L - 1` tokens (one `step` call, float32, eval, no grad), the FLOPs
    (`torch.utils.flop_counter`) of one more `step` on a single token, and the elements of the
    state it returns (`L` tokens).

    `contexts` defaults to the entry's `decoding.contexts`, else its `scaling.ns` (a step that runs
    the prefix again costs a forward, whose lower-order terms that range was chosen to outgrow),
    else `DECODING_CONTEXTS`.
    """
    e = _resolve(e)
    contexts = tuple(contexts or (e.decoding or {}).get("contexts") or e.scaling.get("ns")
                     or DECODING_CONTEXTS)
    make = make or factory(e, dim=SCALING_DIM)
    keywords = accepted_keywords(load(e.id))
    extra: dict[str, Any] = {"causal": True}
    if "max_len" in keywords:
        extra["max_len"] = max(contexts)
    if "heads" in keywords and "heads" not in e.hparams:
        extra["heads"] = SCALING_HEADS
    sizes, flops = [], []
    for n in contexts:
        layer: Any = make(**extra).float()
        x = torch.randn(1, n, SCALING_DIM)
        counter = FlopCounterMode(display=False)
        with torch.no_grad():
            _, state = layer.step(x[:, :n - 1])
            with counter:
                _, state = layer.step(x[:, n - 1:], state)
        sizes.append(state.numel())
        flops.append(counter.get_total_flops())
    return DecodingScaling(contexts, tuple(sizes), tuple(flops))


def reference_scale(layer: nn.Module) -> float | None:
    """The score scale the reference softmax uses: the layer's own `scale`, else `d ** -0.5`."""
    return getattr(layer, "scale", None)


def _softmax_twin(shell: Any, causal: bool) -> Any:
    """Softmax attention (float64) with the shell layer's `to_qkv` and `to_out` weights."""
    from zoo.entries.softmax_attention import SoftmaxAttention

    exact = SoftmaxAttention(shell.dim, heads=shell.heads, dim_head=shell.dim_head,
                             causal=causal).double()
    exact.to_qkv.load_state_dict(shell.to_qkv.state_dict())
    exact.to_out.load_state_dict(shell.to_out.state_dict())
    return exact


def _outputs(layer: nn.Module, n: int, mask, seed: int, temperature: float):
    """The layer's output, softmax attention's and uniform averaging's (softmax with all scores
    zero) on the same q, k, v, the queries divided by `temperature` (float64)."""
    layer = layer.double()
    shell: Any = layer  # attributes of the shell or the entry, looked up by name
    causal = getattr(layer, "causal", False)
    with torch.no_grad():
        if has_attend(layer):
            q, k, v = qkv_for(layer, n, b=2, seed=seed)
            q = q / temperature
            out = shell.attend(q, k, v, mask)
            scale = reference_scale(layer)
            ref = softmax_attention(q, k, v, mask, causal=causal, scale=scale)
            uniform = softmax_attention(q, k, v, mask, causal=causal, scale=0.0)
        elif hasattr(layer, "to_qkv") and hasattr(layer, "to_out"):
            if temperature != 1.0:  # the query rows of to_qkv: the first third of its outputs
                layer = shell = copy.deepcopy(layer)
                shell.to_qkv.weight[: shell.to_qkv.weight.shape[0] // 3] /= temperature
            exact = _softmax_twin(shell, causal)
            x = torch.randn(2, n, shell.dim, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
            out, ref = layer(x, mask=mask) if mask is not None else layer(x), exact(x, mask)
            exact.to_qkv.weight[: exact.to_qkv.weight.shape[0] // 3] = 0.0
            uniform = exact(x, mask)
        else:
            raise TypeError(f"{type(layer).__name__} has neither attend() nor the multi-head shell; "
                            "it cannot be compared with softmax attention")
    if mask is not None and out.ndim == 4:
        keep = mask[:, None, :, None].expand_as(out)
        out, ref, uniform = out[keep], ref[keep], uniform[keep]
    elif mask is not None:
        out, ref, uniform = out[mask], ref[mask], uniform[mask]
    return out, ref, uniform


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def compare_to_softmax(layer: nn.Module, *, n: int = 37, mask=None, seed: int = 0,
                       temperature: float = 1.0) -> float:
    """Relative error of the layer against softmax attention with the same q, k, v (float64).

    Kernel entries are compared through `attend`; other sequence entries on the multi-head shell
    through a softmax layer given the same `to_qkv` and `to_out` weights. `temperature` divides
    the queries (below 1: a peaked softmax, far from uniform).
    """
    out, ref, _ = _outputs(layer, n, mask, seed, temperature)
    return _rel(out, ref)


def gradient_vs_softmax(layer: nn.Module, *, n: int = 37, mask=None, seed: int = 0) -> float:
    """Relative error of the layer's input gradients against softmax attention's (float64), for
    one random output cotangent: through `attend` the gradients of q, k and v, through the shell
    that of x. At an exact limit a layer whose output equals softmax's must also train like it: a
    surrogate gradient that is 1 in value but adds terms (smart-bird's sketch factor once did,
    and stopped the recall model from learning) shows here and not in the outputs."""
    layer = layer.double()
    shell: Any = layer
    causal = getattr(layer, "causal", False)
    g = torch.Generator().manual_seed(seed + 1)
    if has_attend(layer):
        inputs = [t.requires_grad_() for t in qkv_for(layer, n, b=2, seed=seed)]
        out = shell.attend(*inputs, mask)
        ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        rq, rk, rv = ref_inputs
        ref = softmax_attention(rq, rk, rv, mask, causal=causal, scale=reference_scale(layer))
    elif hasattr(layer, "to_qkv") and hasattr(layer, "to_out"):
        exact = _softmax_twin(shell, causal)
        x = torch.randn(2, n, shell.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        inputs, ref_inputs = [x.clone().requires_grad_()], [x.clone().requires_grad_()]
        out = layer(inputs[0], mask=mask) if mask is not None else layer(inputs[0])
        ref = exact(ref_inputs[0], mask)
    else:
        raise TypeError(f"{type(layer).__name__} has neither attend() nor the multi-head shell; "
                        "it cannot be compared with softmax attention")
    cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    if mask is not None:  # only the real positions' outputs carry a loss
        cot = cot * (mask[:, None, :, None] if ref.ndim == 4 else mask[..., None])
    grads = torch.autograd.grad(out, inputs, cot, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, ref_inputs, cot)
    flat = torch.cat([(torch.zeros_like(r) if a is None else a).flatten()
                      for a, r in zip(grads, ref_grads, strict=True)])
    flat_ref = torch.cat([r.flatten() for r in ref_grads])
    return _rel(flat, flat_ref)


def baseline_errors(layer: nn.Module, *, n: int = 37, seed: int = 0,
                    temperature: float = 1.0) -> dict[str, float]:
    """The errors of two trivial answers on the inputs `compare_to_softmax` uses: `uniform`
    (every query averages all the keys it may see) and `zeros` (outputting nothing)."""
    _, ref, uniform = _outputs(layer, n, None, seed, temperature)
    return {"uniform": _rel(uniform, ref), "zeros": _rel(torch.zeros_like(ref), ref)}


# Queries divided by this make softmax far from uniform at the probe's sizes: the scores' spread
# grows fourfold, and averaging is then about as wrong as outputting zeros (see `baseline_errors`).
PEAKED_TEMPERATURE = 0.25
APPROX_N, APPROX_DRAWS = 64, 3


def approximation_error(e: Entry | str, budgets=None, *, n: int = APPROX_N, draws: int = APPROX_DRAWS,
                        make: Make | None = None, temperature: float = 1.0) -> dict:
    """Mean relative error against softmax attention at each budget (`budget.param` in the
    catalogue), over `draws` independently seeded layers and inputs.

    Returns:
        `{budget value: error}` in budget order.
    """
    e = _resolve(e)
    if e.budget is None:
        raise ValueError(f"{e.id} declares no budget in the catalogue")
    param = e.budget["param"]
    budgets = budgets or e.budget["values"]
    make = make or factory(e, dim=DIM)
    out = {}
    for value in budgets:
        errs = []
        for draw in range(draws):
            torch.manual_seed(1000 + draw)
            layer = make(**{param: value})
            errs.append(compare_to_softmax(layer, n=n, seed=draw, temperature=temperature))
        out[value] = sum(errs) / len(errs)
    return out


def approximation_baselines(e: Entry | str, *, n: int = APPROX_N, draws: int = APPROX_DRAWS,
                            make: Make | None = None, temperature: float = 1.0) -> dict[str, float]:
    """`baseline_errors` averaged over the same draws (layers and inputs) `approximation_error`
    uses, so an entry's error can be read against them."""
    e = _resolve(e)
    make = make or factory(e, dim=DIM)
    sums = {"uniform": 0.0, "zeros": 0.0}
    for draw in range(draws):
        torch.manual_seed(1000 + draw)
        for k, v in baseline_errors(make(), n=n, seed=draw, temperature=temperature).items():
            sums[k] += v / draws
    return sums


__all__ = ["PEAKED_TEMPERATURE", "DecodingScaling", "Scaling", "approximation_baselines",
           "approximation_error", "attention_matrix", "baseline_errors", "compare_to_softmax",
           "decoding_scaling", "influence", "qkv_for", "sample", "scaling"]

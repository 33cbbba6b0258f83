"""Every catalogue claim as a check that measures it, and the claims report built from them.

A claim check takes an `Entry` and a `make(**overrides)` factory, raises `ContractError` when the
layer does not do what the entry claims, and returns what it measured. The tests run them over
the whole catalogue; `zoo claims` and the docs home page show their results.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zoo import probe
from zoo.catalog import Entry, cache_root, fingerprint
from zoo.registry import load
from zoo.verify.contract import (
    ContractError,
    Make,
    check_padding,
    check_refuses_causal,
    check_refuses_mask,
    factory,
    sample,
)

SCALING_TOLERANCE = 0.25
EXACT_TOLERANCE = 1e-10


def claim_autoregressive(e: Entry, make: Make) -> str:
    """autoregressive: true => with causal=True the influence map is zero above the diagonal and
    not zero below it; false => causal=True is refused."""
    if not e.autoregressive:
        check_refuses_causal(e, make)
        return "refuses causal=True"
    layer = make(causal=True).double()
    inf = probe.influence(layer, sample(e, b=1, n=12))
    above, below = inf.triu(1).max().item(), inf.tril(-1).max().item()
    if e.pointwise:  # a stronger claim: no position reads any other, so causality is trivial
        off = (inf - inf.diag().diag()).abs().max().item()
        if off > 0 or not bool((inf.diag() > 0).all()):
            raise ContractError(f"pointwise: true, yet outputs depend on other positions "
                                f"(largest off-diagonal influence {off:.3g}) or not on their own")
        return "pointwise: each position alone"
    if above > 1e-12 * max(inf.max().item(), 1.0):
        i, j = divmod(int(inf.triu(1).argmax()), inf.shape[1])
        raise ContractError(f"causal=True, yet output {i} depends on later input {j} "
                            f"(influence {above:.3g})")
    if below == 0.0:
        raise ContractError("causal=True, but no output depends on any earlier input")
    return "causal: influence zero above the diagonal"


def claim_masking(e: Entry, make: Make) -> str:
    """masking: true => padded tokens change nothing; false => a mask is refused."""
    if e.masking:
        check_padding(e, make)
        return "padded tokens ignored"
    if e.input == "sequence":
        check_refuses_mask(e, make)
        return "refuses a mask"
    return "n/a (image)"


def claim_scaling(e: Entry, make: Make | None = None) -> probe.Scaling:
    """Measured FLOP and largest-intermediate exponents within 0.25 of the declared ones, and the
    elements written by all ops growing no faster than the declared time allows."""
    s = probe.scaling(e, make=make)
    problems = []
    for kind, measured in (("time", s.time), ("memory", s.memory)):
        declared = e.scaling[kind]
        if abs(measured - declared) > SCALING_TOLERANCE:
            counts = s.flops if kind == "time" else s.largest
            problems.append(
                f"{kind}: measured exponent {measured:.2f} over n={s.ns} "
                f"({'FLOPs' if kind == 'time' else 'largest tensor'} {counts}), "
                f"declared {declared} (tolerance {SCALING_TOLERANCE})")
    # FLOPs see matrix products only; elementwise, index and sort work must not grow faster.
    if s.work > e.scaling["time"] + SCALING_TOLERANCE:
        problems.append(f"time: elements written by all ops grow as n^{s.work:.2f} over n={s.ns} "
                        f"({s.writes}), faster than the declared n^{e.scaling['time']}")
    if problems:
        raise ContractError("; ".join(problems))
    return s


def claim_decoding(e: Entry, make: Make | None = None) -> probe.DecodingScaling:
    """decoding: {state, step} => the measured exponents of the context length in the decoding
    state's size and in one single-token step's FLOPs are within 0.25 of the declared ones."""
    if e.decoding is None:
        raise ContractError(f"{e.id} is autoregressive but declares no decoding: {{state: p, step: q}}")
    d = probe.decoding_scaling(e, make=make)
    problems = []
    for kind, measured, counts in (("state", d.state_exponent, d.state), ("step", d.step_exponent, d.flops)):
        declared = e.decoding[kind]
        if not abs(measured - declared) <= SCALING_TOLERANCE:
            problems.append(f"decoding {kind}: measured exponent {measured:.2f} over contexts "
                            f"{d.contexts} ({'state elements' if kind == 'state' else 'step FLOPs'} "
                            f"{counts}), declared {declared} (tolerance {SCALING_TOLERANCE})")
    if problems:
        raise ContractError("; ".join(problems))
    return d


QUICK_NS = (128, 256)


def quick_claims(e: Entry, make: Make | None = None, ns: tuple[int, ...] = QUICK_NS) -> list[str]:
    """The scaling claims, checked in about a second for `zoo check`: the FLOPs and the largest
    intermediate tensor measured at two small lengths must not grow faster than declared (plus
    the tolerance). One-sided: at small n lower-order terms make a measured exponent smaller, never
    larger, than the asymptotic one, so a layer that claims linear memory and builds an n x n
    tensor fails here at once; `zoo claims` and the claim tests measure both sides at full size."""
    s = probe.scaling(e, ns, make=make)
    problems = []
    for kind, measured, counts in (("time", s.time, s.flops), ("memory", s.memory, s.largest)):
        declared = e.scaling[kind]
        if measured > declared + SCALING_TOLERANCE:
            what = "FLOPs" if kind == "time" else "largest intermediate tensor (elements)"
            problems.append(f"scaling: {kind} grows as n^{measured:.2f} between n={s.ns[0]} and "
                            f"n={s.ns[-1]} ({what} {counts[0]} -> {counts[-1]}), but the "
                            f"catalogue declares n^{declared}")
    return problems


def claim_exact(e: Entry, make: Make) -> float:
    """exact_when => at those hyper-parameters the output equals softmax attention (float64,
    relative error 1e-10), with a padding mask and causally where the entry supports them; and so
    do the input gradients, in eval and in train mode (a layer equal to softmax in value must also
    train like it)."""
    if e.exact_when is None:
        raise ContractError(f"{e.id} declares no exact_when")
    worst = 0.0
    variants: list[tuple[dict, torch.Tensor | None]] = [({}, None)]
    if e.masking:
        padded = torch.ones(2, 37, dtype=torch.bool)
        padded[1, 25:] = False
        variants.append(({}, padded))
    if e.autoregressive:
        variants.append(({"causal": True}, None))
    for overrides, mask in variants:
        err = probe.compare_to_softmax(make(**e.exact_when, **overrides), mask=mask)
        worst = max(worst, err)
        if not err <= EXACT_TOLERANCE:
            raise ContractError(f"at {dict(e.exact_when, **overrides)}"
                                f"{' with a mask' if mask is not None else ''}: relative error "
                                f"{err:.3g} against softmax attention (allowed {EXACT_TOLERANCE})")
        for train in (False, True):
            err = probe.gradient_vs_softmax(make(**e.exact_when, **overrides).train(train), mask=mask)
            worst = max(worst, err)
            if not err <= EXACT_TOLERANCE:
                raise ContractError(f"at {dict(e.exact_when, **overrides)}"
                                    f"{' with a mask' if mask is not None else ''}"
                                    f"{' in train mode' if train else ''}: the input gradients are "
                                    f"{err:.3g} away from softmax attention's (relative; allowed "
                                    f"{EXACT_TOLERANCE}), though the outputs agree")
    return worst


def default_budget(e: Entry) -> float | None:
    if e.budget is None:
        return None
    param = inspect.signature(load(e.id).__init__).parameters.get(e.budget["param"])
    if param is None or param.default is inspect.Parameter.empty:
        raise ContractError(f"{e.id}: budget parameter {e.budget['param']!r} is not a keyword "
                            "with a default")
    return param.default


def claim_approximation(e: Entry, make: Make) -> dict:
    """The error against softmax attention falls at every step of the budget."""
    errors = probe.approximation_error(e, make=make)
    param = (e.budget or {}).get("param")
    values = list(errors)
    for small, big in zip(values, values[1:], strict=False):
        if not errors[big] < errors[small]:
            raise ContractError(f"{param}={big} gives error {errors[big]:.4g}, not below "
                                f"{errors[small]:.4g} at {param}={small}")
    return errors


def claim_kernel(e: Entry, make: Make) -> float:
    """kernel: true => attend(q, k, v) = A v with A the probe's attention matrix (linear in v)."""
    layer = make().double()
    q, k, v = probe.qkv_for(layer, 13, seed=3)
    a = probe.attention_matrix(layer, q=q, k=k)
    attend: Any = layer.attend
    with torch.no_grad():
        out = attend(q, k, v)
    err = ((out[0] - a @ v[0]).norm() / out[0].norm()).item()
    if not err <= 1e-10:
        raise ContractError(f"attend is not A(q, k) v: relative error {err:.3g}")
    return err


CLAIMS: dict[str, tuple[Callable, Callable[[Entry], bool]]] = {
    "autoregressive": (claim_autoregressive, lambda e: e.input == "sequence" or not e.autoregressive),
    "masking": (claim_masking, lambda e: True),
    "scaling": (claim_scaling, lambda e: True),
    "exact": (claim_exact, lambda e: e.exact_when is not None),
    "approximation": (claim_approximation, lambda e: e.budget is not None),
    "kernel": (claim_kernel, lambda e: e.kernel),
    "decoding": (claim_decoding, lambda e: e.autoregressive and e.input == "sequence"),
}


# --- the report ---------------------------------------------------------------------------

COLUMNS = ("autoregressive", "masking", "time", "memory", "exact", "approximation", "state", "step")


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def claims_row(e: Entry) -> dict:
    """One report row: per claim, what was declared, what was measured, and whether it held."""
    make = factory(e)
    row: dict = {"id": e.id}

    def attempt(name, fn, *args):
        try:
            return True, fn(*args)
        except ContractError as err:
            return False, str(err)
        except Exception as err:  # noqa: BLE001 - a crash is a failed claim, shown as such
            return False, f"{type(err).__name__}: {err}"

    held, info = attempt("autoregressive", claim_autoregressive, e, make)
    row["autoregressive"] = {"declared": e.autoregressive, "held": held,
                             "measured": info if isinstance(info, str) else ""}
    held, info = attempt("masking", claim_masking, e, make)
    row["masking"] = {"declared": e.masking, "held": held, "measured": info}
    s = None
    try:
        s = probe.scaling(e)
    except Exception as err:  # noqa: BLE001
        row["time"] = row["memory"] = {"declared": None, "held": False, "measured": str(err)}
    if s is not None:
        for kind, measured in (("time", s.time), ("memory", s.memory)):
            row[kind] = {"declared": e.scaling[kind], "measured": _fmt(measured),
                         "held": abs(measured - e.scaling[kind]) <= SCALING_TOLERANCE}
    if e.exact_when is None:
        row["exact"] = None
    else:
        held, info = attempt("exact", claim_exact, e, make)
        row["exact"] = {"declared": dict(e.exact_when), "held": held,
                        "measured": f"{info:.1e}" if held else info}
    if e.budget is None:
        row["approximation"] = None
    else:
        held, info = attempt("approximation", claim_approximation, e, make)
        row["approximation"] = {"declared": e.budget["param"], "held": held, "measured": info}
        if held:
            row["approximation"].update(approximation_at_default(e))
    row["state"] = row["step"] = None
    if CLAIMS["decoding"][1](e):
        try:
            d = probe.decoding_scaling(e)
        except Exception as err:  # noqa: BLE001 - a crash is a failed claim, shown as such
            row["state"] = row["step"] = {"declared": None, "held": False,
                                          "measured": f"{type(err).__name__}: {err}"}
        else:
            for kind, measured in (("state", d.state_exponent), ("step", d.step_exponent)):
                declared = (e.decoding or {}).get(kind)
                row[kind] = {"declared": declared, "measured": _fmt(measured),
                             "held": declared is not None and abs(measured - declared) <= SCALING_TOLERANCE}
    return row


def approximation_at_default(e: Entry) -> dict:
    """The error at the layer's default budget beside its baselines (uniform averaging and zeros,
    on the same draws), on the probe's random inputs and on peaked ones (`PEAKED_TEMPERATURE`)."""
    param, default = (e.budget or {})["param"], default_budget(e)
    out: dict = {"param": param, "default": default, "n": probe.APPROX_N, "draws": probe.APPROX_DRAWS}
    for key, temperature in (("random", 1.0), ("peaked", probe.PEAKED_TEMPERATURE)):
        err = probe.approximation_error(e, [default], temperature=temperature)[default]
        out[key] = {"temperature": temperature, "error": err,
                    **probe.approximation_baselines(e, temperature=temperature)}
    r = out["random"]
    out["measured"] = (f"{r['error']:.3f} at {param}={default} (uniform averaging {r['uniform']:.3f}, "
                       f"zeros {r['zeros']:.3f})")
    return out


def claims_report(entries, *, cache_dir: Path | None = None, progress=None) -> list[dict]:
    """Rows for `entries`, reusing cached rows whose fingerprint is unchanged."""
    cache_dir = cache_dir or cache_root() / "claims"
    rows = []
    for e in entries:
        path = cache_dir / f"{e.id}.json"
        key = fingerprint(e, *e.sources)  # the record, its file, what it imports, the core
        cached = json.loads(path.read_text()) if path.is_file() else None
        if cached and cached.get("fingerprint") == key:
            rows.append(cached["row"])
        else:
            row = claims_row(e)
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"fingerprint": key, "row": row}))
            except OSError:
                pass  # a read-only install still gets its report, just uncached
            rows.append(row)
        if progress:
            progress(e.id)
    return rows


def cell(value) -> tuple[str, bool | None]:
    """A report cell as text plus held (True/False) or None where the entry makes no such claim."""
    if value is None:
        return "-", None
    declared, measured, held = value["declared"], value.get("measured", ""), value["held"]
    if isinstance(declared, bool):
        text = "yes" if declared else "no"
    elif isinstance(declared, dict):
        text = "at " + (", ".join(f"{k}={v}" for k, v in declared.items()) or "defaults")
        text += f" ({measured})" if held else ""
    elif isinstance(declared, str):  # approximation: the budget's name
        text = measured if held else f"not falling with {declared}"
    else:
        text = f"{declared} / {measured}"
    return text, held


def report_cells(row: dict) -> list[tuple[str, bool | None]]:
    """The report's cells of one row, in `COLUMNS` order."""
    out = []
    for col in COLUMNS:
        text, held = cell(row.get(col))
        out.append((text, held))
    return out


HEADERS = ("entry", "autoregressive", "masking", "time exp. declared / measured",
           "memory exp. declared / measured", "exact limit",
           "approx. error at default budget, beside uniform averaging and zeros (n=64, random inputs)",
           "decoding state exp. declared / measured", "decoding step exp. declared / measured")

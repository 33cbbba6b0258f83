"""PyTorch features a practitioner relies on, checked on a layer: compile, export, the meta device,
bf16 autocast, `torch.func`, `jit.trace`, train-mode backward, DDP.

Each check takes a catalogue `Entry` and a `make(**overrides)` factory (as the contract's checks
do) and raises `ContractError` when the feature does not work or gives a different answer than
plain eager PyTorch. `tests/test_compat.py` runs the suite's subset (`SUITE`) over the catalogue;
`python -m zoo compat --out benchmarks/compat.json` runs all of them, with inductor, and the site's
Compatibility page renders that file.

An entry that cannot support a feature lists it under its catalogue key `unsupported`, a mapping
`{feature: why}`; the tests hold every entry to that list both ways (a listed feature must still
fail, an unlisted one must work), so the list stays true.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from zoo.catalog import COMPAT_FEATURES, Entry
from zoo.verify.contract import ContractError, Make, factory, sample

# Small inputs: the point is whether a feature works, not how fast. Lengths that are no block
# multiple keep the padding paths in the graph.
N = 21
BATCH = 2
TOL = 1e-7  # float64: compiled, exported and traced graphs agree with eager to rounding


def _mask(e: Entry, b: int = BATCH, n: int = N) -> torch.Tensor | None:
    if not e.masking or e.input != "sequence":
        return None
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, n - 5:] = False
    return mask


def _inputs(e: Entry, *, dtype=torch.float64, seed: int = 1):
    x = sample(e, b=BATCH, n=N, dtype=dtype, seed=seed)
    mask = _mask(e, n=x.shape[1])
    return x, mask


def _call(layer, x, mask):
    return layer(x) if mask is None else layer(x, mask=mask)


def _compare(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = TOL) -> None:
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise ContractError(f"{what}: expected shape {tuple(want.shape)}, got "
                            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got)}")
    scale = max(want.abs().max().item(), 1.0)
    err = (got - want).abs().max().item()
    if not err <= tol * scale:  # NaN fails too
        raise ContractError(f"{what}: max difference {err:.3g} against eager (allowed "
                            f"{tol * scale:.3g})")


def _crash(what: str, err: Exception) -> ContractError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ContractError(f"{what} raised {type(err).__name__}: {first[:300]}")


def _forward_backward(layer, x, mask):
    """Output and the input's gradient of a fixed loss (its gradient checked too, not only values)."""
    x = x.detach().clone().requires_grad_(True)
    out = _call(layer, x, mask)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), grad


# --- the checks ---------------------------------------------------------------------------

def check_train_backward(e: Entry, make: Make) -> None:
    """Train mode: forward and backward run, every gradient is finite."""
    layer = make().double().train()
    x, mask = _inputs(e)
    try:
        _call(layer, x.requires_grad_(True), mask).square().sum().backward()
    except Exception as err:  # noqa: BLE001 - any crash is the finding
        raise _crash("train-mode backward", err) from err
    for name, p in [("input", x), *layer.named_parameters()]:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            raise ContractError(f"train-mode backward: gradient of {name} not finite")


def check_compile(e: Entry, make: Make, *, backend: str = "aot_eager") -> None:
    """`torch.compile(layer, backend=...)` gives eager's output and input gradient (float64, eval)."""
    layer = make().double()
    x, mask = _inputs(e)
    want = _forward_backward(layer, x, mask)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, backend=backend)
        got = _forward_backward(compiled, x, mask)
        # a second call with other values: a graph that baked in the first call's values differs
        x2, _ = _inputs(e, seed=5)
        got2 = _call(compiled, x2, mask).detach()
    except Exception as err:  # noqa: BLE001
        raise _crash(f"torch.compile (backend {backend})", err) from err
    finally:
        torch._dynamo.reset()
    _compare(got[0], want[0], f"compiled ({backend}) output")
    _compare(got[1], want[1], f"compiled ({backend}) input gradient", tol=1e-6)
    _compare(got2, _call(layer, x2, mask).detach(), f"compiled ({backend}) output, second input")


def check_export(e: Entry, make: Make) -> None:
    """`torch.export.export(layer, ...)` works, and the exported program gives eager's output on a
    new input of the same shape."""
    layer = make().double()
    x, mask = _inputs(e)
    kwargs = {} if mask is None else {"mask": mask}
    try:
        program = torch.export.export(layer, (x,), kwargs)
        x2, _ = _inputs(e, seed=5)
        got = program.module()(x2, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise _crash("torch.export.export", err) from err
    with torch.no_grad():
        _compare(got.detach(), _call(layer, x2, mask), "exported output")


def check_meta(e: Entry, make: Make) -> None:
    """Built on the meta device and run on meta inputs, the layer returns a meta tensor of the
    input's shape (what `init_empty_weights`-style loading and shape inference rely on)."""
    x, mask = _inputs(e, dtype=torch.float32)
    try:
        with torch.device("meta"):
            layer = make()
        meta_x = x.to("meta")
        out = _call(layer, meta_x, None if mask is None else mask.to("meta"))
    except Exception as err:  # noqa: BLE001
        raise _crash("the meta device", err) from err
    if not isinstance(out, torch.Tensor) or out.device.type != "meta" or out.shape != x.shape:
        raise ContractError(f"the meta device: expected a meta tensor of shape {tuple(x.shape)}, "
                            f"got {getattr(out, 'device', type(out))} {tuple(getattr(out, 'shape', ()))}")
    stray = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.device.type != "meta"]
    if stray:
        raise ContractError(f"the meta device: {', '.join(stray)} not created on the meta device")


def check_autocast(e: Entry, make: Make) -> None:
    """Under `torch.autocast("cpu", dtype=torch.bfloat16)` a float32 layer runs forward and
    backward with finite values, and stays near its float32 output (bf16 has 8 bits)."""
    layer = make()
    x, mask = _inputs(e, dtype=torch.float32)
    with torch.no_grad():
        want = _call(layer, x, mask)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xg = x.clone().requires_grad_(True)
            out = _call(layer, xg, mask)
        out.float().square().sum().backward()
    except Exception as err:  # noqa: BLE001
        raise _crash("bf16 autocast", err) from err
    if not bool(torch.isfinite(out).all()) or xg.grad is None or not bool(torch.isfinite(xg.grad).all()):
        raise ContractError("bf16 autocast: output or input gradient not finite")
    # bf16 keeps 8 bits; hashing and sorting entries may also flip a few discrete choices
    _compare(out.float(), want, "bf16 autocast output", tol=0.5)


def check_functional_call(e: Entry, make: Make) -> None:
    """`torch.func.functional_call` with other parameters (the layer's, scaled) equals the layer
    with those parameters loaded: the layer reads its weights through the module, not from a
    copy taken at construction."""
    layer = make().double()
    x, mask = _inputs(e)
    scaled = {n: p.detach() * 1.5 for n, p in layer.named_parameters()}
    state = {**scaled, **dict(layer.named_buffers())}
    args = (x,) if mask is None else (x, mask)
    try:
        with torch.no_grad():
            got = torch.func.functional_call(layer, state, args)
    except Exception as err:  # noqa: BLE001
        raise _crash("torch.func.functional_call", err) from err
    other = copy.deepcopy(layer)
    with torch.no_grad():
        for n, p in other.named_parameters():
            p.copy_(scaled[n])
        _compare(got, _call(other, x, mask), "functional_call output")


def check_vmap(e: Entry, make: Make) -> None:
    """`torch.func.vmap` over a leading axis of inputs equals calling the layer on each."""
    layer = make().double()
    xs = torch.stack([_inputs(e, seed=s)[0] for s in (1, 2)])
    mask = _mask(e, n=xs.shape[2])
    try:
        with torch.no_grad():
            got = torch.func.vmap(lambda x: _call(layer, x, mask))(xs)
    except Exception as err:  # noqa: BLE001
        raise _crash("torch.func.vmap", err) from err
    with torch.no_grad():
        for i in range(len(xs)):
            _compare(got[i], _call(layer, xs[i], mask), f"vmap output {i}")


def check_jit_trace(e: Entry, make: Make) -> None:
    """`torch.jit.trace` works, and the traced module gives eager's output on a new input."""
    layer = make().double()
    x, mask = _inputs(e)
    args = (x,) if mask is None else (x, mask)
    try:
        with warnings_off():
            traced = torch.jit.trace(layer, args, check_trace=False)
        x2, _ = _inputs(e, seed=5)
        with torch.no_grad():
            got = traced(x2) if mask is None else traced(x2, mask)
    except Exception as err:  # noqa: BLE001
        raise _crash("torch.jit.trace", err) from err
    with torch.no_grad():
        _compare(got, _call(layer, x2, mask), "traced output")


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_state_dict(e: Entry, make: Make) -> None:
    """A deepcopy, and a fresh layer given the state_dict of a trained-looking one (floating
    parameters and buffers moved off their initial values), both equal the original: no state
    lives outside the state_dict."""
    layer = make().double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for t in [*layer.parameters(), *layer.buffers()]:
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    x, mask = _inputs(e)
    with torch.no_grad():
        want = _call(layer, x, mask)
        _compare(_call(copy.deepcopy(layer), x, mask), want, "deepcopy output")
        other = make().double()
        other.load_state_dict(layer.state_dict())
        _compare(_call(other, x, mask), want, "output after load_state_dict")


# feature -> (check, what it says in the table)
CHECKS: dict[str, tuple[Callable[..., None], str]] = {
    "train-backward": (check_train_backward, "forward + backward in train mode"),
    "compile": (check_compile, "torch.compile matches eager (output and gradient)"),
    "export": (check_export, "torch.export.export, then the program matches eager"),
    "meta": (check_meta, "built and run on the meta device"),
    "autocast-bf16": (check_autocast, "bf16 autocast on CPU, forward + backward"),
    "functional-call": (check_functional_call, "torch.func.functional_call"),
    "vmap": (check_vmap, "torch.func.vmap over inputs"),
    "jit-trace": (check_jit_trace, "torch.jit.trace matches eager on a new input"),
    "state-dict": (check_state_dict, "deepcopy and state_dict round trip"),
    "ddp": (lambda e, make: None, "2-process DDP (gloo): ranks stay equal"),
}
assert set(CHECKS) == set(COMPAT_FEATURES), "zoo.catalog.COMPAT_FEATURES and CHECKS disagree"

# What the test suite checks over every entry (the others are in the committed table).
SUITE = ("compile", "export", "meta")


def unsupported(e: Entry) -> dict[str, str]:
    """The features the entry's catalogue card says it cannot support, with the reason."""
    return dict(e.unsupported or {})


def run(e: Entry, feature: str, make: Make | None = None, **kw: Any) -> tuple[bool, str, float]:
    """(works, what failed or "", seconds) for one entry and feature."""
    make = make or factory(e)
    start = time.perf_counter()
    try:
        CHECKS[feature][0](e, make, **kw)
        ok, why = True, ""
    except ContractError as err:
        ok, why = False, str(err)
    except Exception as err:  # noqa: BLE001 - a crash in the harness is recorded, not raised
        ok, why = False, f"{type(err).__name__}: {err}"
    return ok, why, time.perf_counter() - start


# --- DDP ----------------------------------------------------------------------------------

def _layer_class(entry_id: str, planted: tuple[str, str] | None):
    """The entry's layer class, or (tests) a class `name` defined in the file `path`."""
    if planted is None:
        from zoo.registry import load

        return load(entry_id)
    import importlib.util

    path, name = planted
    spec = importlib.util.spec_from_file_location("zoo_planted_defect", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def ddp_worker(rank: int, world: int, entry_id: str, steps: int, out_dir: str,
               planted: tuple[str, str] | None = None) -> None:
    """One rank: a few SGD steps of DDP over the entry's layer in train mode on rank-specific data,
    then its parameters and buffers saved to `out_dir/rank{rank}.pt`. Buffers are not broadcast
    (`broadcast_buffers=False`): a layer that updates buffers in training must keep the ranks
    equal itself, by reducing its statistics, or they drift apart."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from zoo.registry import entry

    torch.set_num_threads(1)
    # Rendezvous through a file in the run's own directory, not a TCP port: a port picked free
    # and then released can be taken by a concurrent run (the test suite runs two workers).
    store = "file://" + os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        e = entry(entry_id)
        layer = factory(e, cls=_layer_class(entry_id, planted))().double().train()
        # no buffer sync at each forward (the keyword was renamed in torch 2.12)
        import inspect

        quiet = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        sync: dict[str, Any] = {"forward_sync_buffers": False} if quiet else {"broadcast_buffers": False}
        model = DistributedDataParallel(layer, **sync)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(steps):
            x = ddp_batch(e, rank, step)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in layer.state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears down: a rank whose peer closed the gloo pairs while
        # it was still finishing aborted with "terminate called without an active exception"
        # (seen once in CI, routing-transformer).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def ddp_batch(e: Entry, rank: int, step: int) -> torch.Tensor:
    """Each rank's own data at each step: the ranks must not see the same batch."""
    return sample(e, b=2, n=16, seed=100 * step + rank)


def run_ddp(entry_id: str, *, steps: int = 3, world: int = 2,
            planted: tuple[str, str] | None = None) -> list[dict[str, torch.Tensor]]:
    """Run `ddp_worker` on `world` local processes (gloo on loopback); return each rank's final
    state_dict."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(ddp_worker, args=(world, entry_id, steps, out, planted),
                           nprocs=world, join=True, start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


def check_ddp(entry_id: str, **kw) -> None:
    """After DDP steps on different data per rank, every parameter and buffer is equal on all
    ranks."""
    states = run_ddp(entry_id, **kw)
    for name, t in states[0].items():
        for r, other in enumerate(states[1:], 1):
            if not torch.allclose(other[name], t, rtol=1e-10, atol=1e-12):
                diff = (other[name] - t).abs().max().item()
                raise ContractError(f"DDP: {name} differs between rank 0 and rank {r} by {diff:.3g}")


def machine() -> dict:
    import datetime as _dt

    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "load": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


# --- the table ----------------------------------------------------------------------------

# Entries whose training mode updates buffers: the DDP check runs on these.
DDP_ENTRIES = ("routing-transformer", "expectation-maximization-attention")


def graph_breaks() -> int:
    """Graph breaks dynamo counted since the last `torch._dynamo.reset()`-time counter clear."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# The table's columns: every check, compile with two backends. "compile" (aot_eager: dynamo and
# AOT autograd, forward and backward) runs for every entry first; "inductor" (the default backend,
# which generates and builds C++ kernels: a minute or more per entry on a busy machine) in a
# second pass, so a run cut short still has every other column.
COLUMNS = (*(f for f in COMPAT_FEATURES), "inductor", "speed")
# Columns measured in later passes and kept from a previous run (delete a cell to re-measure it).
SLOW_COLUMNS = ("inductor", "speed")

# The speed column: compiled (inductor) against eager, forward without gradients, at the benchmark's
# width and a length where the mechanism's structure is in play (image entries on a 45 x 45 grid).
SPEED = {"n": 2048, "dim": 256, "heads": 4, "repeats": 5}


def _paired_medians(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of `first()` and of `second()`, timed alternately (first, second, first, ...),
    so that a change in the machine's load during the measurement falls on both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return tuple(sorted(t)[len(t) // 2] for t in times)  # type: ignore[return-value]


def compiled_speed(e: Entry, *, n: int = SPEED["n"], dim: int = SPEED["dim"], heads: int = SPEED["heads"],
                   repeats: int = SPEED["repeats"]) -> dict:
    """Median forward time, eager and `torch.compile` (inductor), in this process with its threads:
    `{"n", "eager_s", "compiled_s", "graph_breaks"}` (a measurement for the committed table, never
    asserted in a test). Both after warm-up passes; the compiled one after it has compiled; the two
    timed in alternation (a first measurement timed all eager passes, then all compiled ones, and
    its ratio moved with the load of the machine)."""
    from torch._dynamo.utils import counters

    from zoo.verify.bench import _inputs

    layer, x, n_real = _inputs(e.id, n, dim=dim, heads=heads, backward=False, device="cpu")
    layer.eval()
    with torch.no_grad():
        layer(x)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(layer)
        compiled(x)  # compiles
        compiled(x)
        layer(x)
        eager, fast = _paired_medians(lambda: layer(x), lambda: compiled(x), repeats)
    return {"n": n_real, "eager_s": round(eager, 5), "compiled_s": round(fast, 5),
            "graph_breaks": graph_breaks()}


def table_cell(e: Entry, column: str) -> dict | None:
    """`{"ok", "why", "seconds"}` for one entry and column (compile columns add `graph_breaks`);
    None where the column does not apply (DDP outside `DDP_ENTRIES`)."""
    from torch._dynamo.utils import counters

    if column == "speed":
        start = time.perf_counter()
        try:
            speed: dict = {"ok": True, "why": "", **compiled_speed(e)}
        except Exception as err:  # noqa: BLE001 - recorded, not raised
            speed = {"ok": False, "why": " ".join(f"{type(err).__name__}: {err}".split())[:400]}
        return {**speed, "seconds": round(time.perf_counter() - start, 2)}
    if column == "ddp":
        if e.id not in DDP_ENTRIES:
            return None
        start = time.perf_counter()
        try:
            check_ddp(e.id)
            ok, why = True, ""
        except Exception as err:  # noqa: BLE001 - recorded, not raised
            ok, why = False, f"{type(err).__name__}: {err}"
        secs = time.perf_counter() - start
    else:
        counters.clear()
        feature: str
        kw: dict[str, Any]
        feature, kw = {"compile": ("compile", {"backend": "aot_eager"}),
                       "inductor": ("compile", {"backend": "inductor"})}.get(column, (column, {}))
        ok, why, secs = run(e, feature, None, **kw)
    cell: dict = {"ok": ok, "why": " ".join(why.split())[:400], "seconds": round(secs, 2)}
    if column in ("compile", "inductor"):
        cell["graph_breaks"] = graph_breaks()
    return cell


def table(entries: list[Entry], *, columns=COLUMNS, previous=None, progress=None,
          save=None) -> dict:
    """Every column for every entry: `{"machine", "columns", "rows": {id: {column: cell}}}`, in
    passes (inductor, then the compiled-against-eager speed, last). Cells of `previous` are kept,
    and its inductor and speed cells are not re-measured (delete them to); `save(data)` runs after
    each entry, so an interrupted run keeps what it measured."""
    data: dict[str, Any] = {"machine": machine(), "columns": list(columns),
            "rows": {i: dict(r) for i, r in (previous or {}).get("rows", {}).items()}}
    passes = [[c for c in columns if c not in SLOW_COLUMNS], *([c] for c in SLOW_COLUMNS if c in columns)]
    for cols in passes:
        for e in entries:
            if not cols:
                continue
            row = data["rows"].setdefault(e.id, {})
            for c in cols:
                if c in SLOW_COLUMNS and c in row:
                    continue
                cell = table_cell(e, c)
                if cell is not None:
                    row[c] = cell
            data["rows"] = dict(sorted(data["rows"].items()))
            if save:
                save(data)
            if progress:
                progress(e.id)
    return data


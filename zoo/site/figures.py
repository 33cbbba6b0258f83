"""Pictures for the docs site, computed from the references at build time (matplotlib, Agg).

Each function returns PNG bytes; `cached_png` keeps them under `.cache/figures/` keyed by a
fingerprint of everything they depend on, so a rebuild with nothing changed is fast.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch

from zoo import probe
from zoo.catalog import Entry, cache_root, fingerprint
from zoo.verify.contract import factory, sample

PATTERN_N = 24


def cached_png(name: str, key_parts: tuple, render: Callable[[], bytes],
               cache_dir: Path | None = None) -> bytes:
    cache_dir = cache_dir or cache_root() / "figures"
    path = cache_dir / f"{name}-{fingerprint(*key_parts)}.png"
    if path.is_file():
        return path.read_bytes()
    try:
        data = render()
    except Exception as err:  # noqa: BLE001 - an unfinished entry must not stop the whole site
        return failed_png(name, err)  # not cached: drawn again once the entry runs
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for old in cache_dir.glob(f"{name}-*.png"):
            old.unlink()
        path.write_bytes(data)
    except OSError:
        pass
    return data


def failed_png(name: str, err: Exception) -> bytes:
    """A picture that says why `name` could not be drawn (an entry still being written, say
    `zoo new`'s TODO), so the site still builds and the reason is on the page."""
    import textwrap

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    why = textwrap.fill(f"{type(err).__name__}: {err}", 80)
    ax.text(0.0, 0.5, f"{name}: could not be drawn\n{why}", va="center", family="monospace",
            fontsize=8, transform=ax.transAxes)
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def pattern_maps(e: Entry, n: int = PATTERN_N) -> list[tuple[str, torch.Tensor]]:
    """(title, (n, n) map) pairs: the attention matrix of head 0 for kernel entries, the influence
    map otherwise; causal too where the entry is autoregressive."""
    make = factory(e)
    modes: list[tuple[str, dict]] = [("full", {})]
    if e.autoregressive:
        modes.append(("causal", {"causal": True}))
    out = []
    for label, kw in modes:
        layer = make(**kw).double()
        if e.kernel:
            m = probe.attention_matrix(layer, n if e.input == "sequence" else 36)[0].abs()
            title = f"attention matrix, {label}"
        else:
            m = probe.influence(layer, sample(e, b=1, n=n if e.input == "sequence" else 36))
            title = f"influence |dy_i/dx_j|, {label}"
        out.append((title, m.detach()))
    return out


def pattern_png(e: Entry) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    maps = pattern_maps(e)
    fig, axes = plt.subplots(1, len(maps), figsize=(3.4 * len(maps), 3.2), squeeze=False)
    for ax, (title, m) in zip(axes[0], maps, strict=True):
        # Each row scaled to its own maximum, on a power scale, so weak links stay visible.
        m = m / m.amax(dim=1, keepdim=True).clamp(min=1e-30)
        ax.imshow(m.numpy(), cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1),
                  interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key / input position j" if e.input == "sequence" else "input pixel j",
                      fontsize=8)
        ax.set_ylabel("query / output position i" if e.input == "sequence" else "output pixel i",
                      fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(e.id, fontsize=10)
    return _png(fig)


def approximation_png(e: Entry, errors: dict, baselines: dict | None = None,
                      peaked: tuple[dict, dict] | None = None) -> bytes:
    """Error against the budget, with the uniform-averaging and zeros baselines as dashed lines;
    `peaked` = (errors, baselines) on peaked inputs, drawn in a second colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 3.4), layout="constrained")
    series = [("random inputs", errors, baselines, "#5e35b1")]
    if peaked:
        series.append(("peaked inputs", peaked[0], peaked[1], "#ef6c00"))
    for label, errs, base, colour in series:
        ax.plot(list(errs), list(errs.values()), marker="o", color=colour, label=label)
        if base:
            ax.axhline(base["uniform"], color=colour, ls="--", lw=1,
                       label=f"uniform averaging ({label})")
    if baselines:
        ax.axhline(baselines["zeros"], color="black", ls=":", lw=1, label="zeros")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(str((e.budget or {}).get("param")), fontsize=9)
    ax.set_ylabel("relative error vs softmax", fontsize=9)
    ax.set_title(f"{e.display_name}: error as the budget grows", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def pattern_figure(e: Entry) -> bytes:
    return cached_png(f"pattern-{e.id}", (e, *e.sources), lambda: pattern_png(e))


def approximation_figure(e: Entry) -> bytes:
    def draw() -> bytes:
        t = probe.PEAKED_TEMPERATURE
        return approximation_png(e, probe.approximation_error(e), probe.approximation_baselines(e),
                                 (probe.approximation_error(e, temperature=t),
                                  probe.approximation_baselines(e, temperature=t)))

    return cached_png(f"approx-{e.id}", (e, *e.sources, "baselines"), draw)


def _series(points: list[dict], key: str):
    ok = [p for p in points if isinstance(p.get(key), (int, float)) and p[key] > 0
          and (key != "time_s" or p.get("status", "ok") == "ok")]
    scale = 1e3 if key.startswith("time") else 1 / 2**20
    return [p["n"] for p in ok], [p[key] * scale for p in ok]


def bench_png(data: dict, names: list[str], title: str) -> bytes:
    """Time (plain process; forward, and forward + backward where measured) and peak memory against
    n, log-log, one line per entry, the SDPA baseline in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zoo.verify.bench import BASELINE

    s = data["settings"]
    panels = [("time_s", "forward time (ms)")]
    if s.get("backward") and "passes" in s:  # files before the training columns timed one pass
        panels.append(("time_fb_s", "forward + backward time (ms)"))
    panels.append(("peak_bytes", "forward peak memory (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), layout="constrained")
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name in [BASELINE, *names]:
            r = data["results"].get(name)
            if r is None:
                continue
            xs, ys = _series(r["points"], key)
            if not xs:
                continue
            base = name == BASELINE
            ax.plot(xs, ys, marker="o", ms=3, lw=2.6 if base else 1.3,
                    color="black" if base else None, label="SDPA (baseline)" if base else name,
                    zorder=3 if base else 2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (tokens, or pixels for images)", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if "passes" in s:
        what = "plain process"
    else:
        what = "forward+backward" if s["backward"] else "forward"
    fig.suptitle(f"{title} (dim {s['dim']}, {s['heads']} heads, {what})", fontsize=10)
    return _png(fig)

"""Pictures for the docs site, computed from the references at build time (matplotlib, Agg).

Each function returns PNG bytes; `cached_png` keeps them under `.cache/figures/` keyed by a
fingerprint of everything they depend on, so a rebuild with nothing changed is fast.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zoo import probe
from zoo.catalog import Entry, cache_root, fingerprint
from zoo.verify.contract import factory, sample

PATTERN_N = 24


def cached_png(name: str, key_parts: tuple, render: Callable[[], bytes],
               cache_dir: Path | None = None, dark: bool = False) -> bytes:
    """`render()`, cached under `name` and a fingerprint of `key_parts`; a picture of the reason
    (in the dark scheme's colours with `dark`) if it cannot be drawn."""
    cache_dir = cache_dir or cache_root() / "figures"
    key = fingerprint(*key_parts)
    path = cache_dir / f"{name}-{key}.png"
    if path.is_file():
        return path.read_bytes()
    try:
        data = render()
    except Exception as err:  # noqa: BLE001 - an unfinished entry must not stop the whole site
        return failed_png(name, err, dark=dark)  # not cached: drawn again once the entry runs
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # this name's older versions only: `pattern-linear-*.png` would match linear-transformer's
        for old in cache_dir.glob(f"{name}-{'?' * len(key)}.png"):
            old.unlink()
        path.write_bytes(data)
    except OSError:
        pass
    return data


def themed_pngs(name: str, key_parts: tuple, render: Callable[[bool], bytes]) -> tuple[bytes, bytes]:
    """`render(dark)` for the light and for the dark scheme (zoo.site.pages.themed_figure shows
    the one that matches the page), each cached: the dark one as `dark-<name>`."""
    light = cached_png(name, key_parts, lambda: render(False))
    dark = cached_png(f"dark-{name}", (*key_parts, DARK_STYLE), lambda: render(True), dark=True)
    return light, dark


def failed_png(name: str, err: Exception, dark: bool = False) -> bytes:
    """A picture that says why `name` could not be drawn (an entry still being written, say
    `zoo new`'s TODO), so the site still builds and the reason is on the page; `dark`: in the
    dark scheme's colours."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _scheme(dark):
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        why = textwrap.fill(f"{type(err).__name__}: {err}", 80)
        ax.text(0.0, 0.5, f"{name}: could not be drawn\n{why}", va="center", family="monospace",
                fontsize=8, transform=ax.transAxes)
        return _png(fig, transparent=dark)


def _png(fig, transparent: bool = False) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", transparent=transparent)
    plt.close(fig)
    return buf.getvalue()


# The dark variant of a picture, for the site's dark scheme (Material's slate): no background of its
# own (the page's shows through) and its text, ticks and frames light. The colour map is the same.
DARK_INK = "#dfe2ea"
DARK_STYLE = {**{name: DARK_INK for name in ("text.color", "axes.labelcolor", "axes.edgecolor",
                                             "xtick.color", "ytick.color")},
              "legend.facecolor": "none", "legend.edgecolor": "#6b7080"}


def _scheme(dark: bool):
    import matplotlib.pyplot as plt

    style: Any = DARK_STYLE if dark else {}  # matplotlib types rc keys as a Literal of names
    return plt.rc_context(style)


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


def pattern_png(e: Entry, dark: bool = False, maps: list | None = None) -> bytes:
    """The pattern maps side by side; `dark`: the variant for the dark scheme (DARK_STYLE)."""
    import matplotlib

    matplotlib.use("Agg")

    maps = pattern_maps(e) if maps is None else maps
    with _scheme(dark):
        return _pattern_png(e, maps, dark)


def _pattern_png(e: Entry, maps: list, dark: bool) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

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
    return _png(fig, transparent=dark)


def approximation_png(e: Entry, errors: dict, baselines: dict | None = None,
                      peaked: tuple[dict, dict] | None = None, dark: bool = False) -> bytes:
    """Error against the budget, with the uniform-averaging and zeros baselines as dashed lines;
    `peaked` = (errors, baselines) on peaked inputs, drawn in a second colour; `dark`: the
    variant for the dark scheme."""
    import matplotlib

    matplotlib.use("Agg")

    with _scheme(dark):
        return _approximation_png(e, errors, baselines, peaked, dark)


def _approximation_png(e: Entry, errors: dict, baselines: dict | None,
                       peaked: tuple[dict, dict] | None, dark: bool) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 3.4), layout="constrained")
    series = [("random inputs", errors, baselines, "#b39ddb" if dark else "#5e35b1")]
    if peaked:
        series.append(("peaked inputs", peaked[0], peaked[1], "#ffb74d" if dark else "#ef6c00"))
    for label, errs, base, colour in series:
        ax.plot(list(errs), list(errs.values()), marker="o", color=colour, label=label)
        if base:
            ax.axhline(base["uniform"], color=colour, ls="--", lw=1,
                       label=f"uniform averaging ({label})")
    if baselines:
        ax.axhline(baselines["zeros"], color=DARK_INK if dark else "black", ls=":", lw=1,
                   label="zeros")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(str((e.budget or {}).get("param")), fontsize=9)
    ax.set_ylabel("relative error vs softmax", fontsize=9)
    ax.set_title(f"{e.display_name}: error as the budget grows", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig, transparent=dark)


def pattern_figures(e: Entry) -> tuple[bytes, bytes]:
    """The pattern picture for the light and for the dark scheme; the maps computed once."""
    maps = functools.cache(lambda: pattern_maps(e))
    return themed_pngs(f"pattern-{e.id}", (e, *e.sources),
                       lambda dark: pattern_png(e, dark=dark, maps=maps()))


def approximation_figures(e: Entry) -> tuple[bytes, bytes]:
    """The approximation picture for the light and for the dark scheme; the errors measured once."""
    @functools.cache
    def measured() -> tuple[dict, dict, tuple[dict, dict]]:
        t = probe.PEAKED_TEMPERATURE
        return (probe.approximation_error(e), probe.approximation_baselines(e),
                (probe.approximation_error(e, temperature=t),
                 probe.approximation_baselines(e, temperature=t)))

    def draw(dark: bool) -> bytes:
        errors, baselines, peaked = measured()
        return approximation_png(e, errors, baselines, peaked, dark=dark)

    return themed_pngs(f"approx-{e.id}", (e, *e.sources, "baselines"), draw)


def _series(points: list[dict], key: str):
    ok = [p for p in points if isinstance(p.get(key), (int, float)) and p[key] > 0
          and (key != "time_s" or p.get("status", "ok") == "ok")]
    scale = 1e3 if key.startswith("time") else 1 / 2**20
    return [p["n"] for p in ok], [p[key] * scale for p in ok]


def _tokens(n: float, _pos=None) -> str:
    """A power-of-two length as people write it: 1024 -> 1k, 16384 -> 16k, 512 -> 512."""
    return f"{int(n) // 1024}k" if n >= 1024 and n % 1024 == 0 else f"{n:g}"


def _plain_log_labels(ax) -> None:
    """Plain numbers on log axes (n as 1k ... 16k, times as 10, 100, 1000) instead of matplotlib's
    powers (2^14, 10^3), and minor ticks at 2 and 5 of each decade only: easier to read, and
    cheaper to draw (mathtext and the eight minor ticks a decade were half the time of drawing the
    site's 158 benchmark pictures)."""
    from matplotlib.ticker import FuncFormatter, LogFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_locator(LogLocator(10, subs=(2.0, 5.0)))
    ax.yaxis.set_major_formatter(LogFormatter(10))
    ax.yaxis.set_minor_formatter(LogFormatter(10, labelOnlyBase=False))  # (shown on short ranges)


def bench_png(data: dict, names: list[str], title: str, dark: bool = False) -> bytes:
    """Time (plain process; forward, and forward + backward where measured) and peak memory against
    n, log-log, one line per entry, the SDPA baseline in black (`dark`: the variant for the dark
    scheme, the baseline in DARK_INK)."""
    import matplotlib

    matplotlib.use("Agg")

    with _scheme(dark):
        return _bench_png(data, names, title, dark)


def _bench_png(data: dict, names: list[str], title: str, dark: bool) -> bytes:
    import matplotlib.pyplot as plt

    from zoo.verify.bench import BASELINE

    s = data["settings"]
    panels = [("time_s", "forward time (ms)")]
    if s.get("backward") and "passes" in s:  # files before the training columns timed one pass
        panels.append(("time_fb_s", "forward + backward time (ms)"))
    panels.append(("peak_bytes", "forward peak memory (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    fig.subplots_adjust(wspace=0.3)  # (the saved picture is cropped to what is drawn: `_png`)
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
                    color=(DARK_INK if dark else "black") if base else None,
                    label="SDPA (baseline)" if base else name,
                    zorder=3 if base else 2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _plain_log_labels(ax)
        ax.set_xlabel("n (tokens, or pixels for images)", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if "passes" in s:
        what = "plain process"
    else:
        what = "forward+backward" if s["backward"] else "forward"
    fig.suptitle(f"{title} (dim {s['dim']}, {s['heads']} heads, {what})", fontsize=10)
    return _png(fig, transparent=dark)

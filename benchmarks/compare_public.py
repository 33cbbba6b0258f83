"""Side-by-side forward time of zoo entries and public CPU implementations of the same mechanism.

The public packages are NOT dependencies of the zoo: `make bench-public` installs them (without
their dependencies' torch) into .cache/public and runs this script with that folder on
PYTHONPATH. Each pair is built with matched hyper-parameters (listed in the output), timed in the
same process, interleaved, median of `--repeats` forward passes after a warm-up.

    python benchmarks/compare_public.py --n 4096 16384 --out benchmarks/public.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402
from zoo.verify.bench import TIME_ENV, machine  # noqa: E402

DIM, HEADS = 256, 4


class Projected(nn.Module):
    """q/k/v and output projections around an attention function on `(b, h, n, d)`, the same
    cost as the zoo's multi-head shell, for public modules that take q, k, v."""

    def __init__(self, attend):
        super().__init__()
        self.to_qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.to_out = nn.Linear(DIM, DIM)
        self.attend = attend

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, DIM))


def pairs(n: int):
    """(entry, settings, ours, theirs, input) for each comparison at length n."""
    side = round(math.sqrt(n))
    x = torch.randn(1, n, DIM)
    out = []

    import performer_pytorch
    for causal in (False, True):
        out.append(("performer", f"256 features, causal={causal}",
                    zoo.create("performer", dim=DIM, heads=HEADS, features=256, causal=causal),
                    performer_pytorch.SelfAttention(dim=DIM, heads=HEADS, dim_head=DIM // HEADS,
                                                    nb_features=256, causal=causal), x))
    from nystrom_attention import NystromAttention
    out.append(("nystromformer", "64 landmarks, 6 pinv iterations, no conv residual",
                zoo.create("nystromformer", dim=DIM, heads=HEADS, landmarks=64, pinv_iters=6),
                NystromAttention(dim=DIM, dim_head=DIM // HEADS, heads=HEADS, num_landmarks=64,
                                 pinv_iterations=6, residual=False), x))
    from linformer import LinformerSelfAttention
    out.append(("linformer", "r = k = 64",
                zoo.create("linformer", dim=DIM, heads=HEADS, max_len=n, r=64),
                LinformerSelfAttention(dim=DIM, seq_len=n, k=64, heads=HEADS), x))
    from local_attention import LocalAttention
    local = LocalAttention(window_size=64, causal=False, look_backward=1, look_forward=1,
                           dim=DIM // HEADS, use_rotary_pos_emb=False)
    out.append(("longformer", "no global tokens; window: ours 128, theirs 3 blocks of 64",
                zoo.create("longformer", dim=DIM, heads=HEADS, window=128, global_tokens=0),
                Projected(lambda q, k, v: local(q, k, v)), x))
    from reformer_pytorch import LSHSelfAttention
    out.append(("reformer", "2 hash rounds, chunks/buckets of 64",
                zoo.create("reformer", dim=DIM, heads=HEADS, n_hashes=2, chunk_size=64),
                LSHSelfAttention(dim=DIM, heads=HEADS, bucket_size=64, n_hashes=2), x))
    from sinkhorn_transformer import SinkhornSelfAttention
    out.append(("sinkhorn-attention", "64 blocks",
                zoo.create("sinkhorn-attention", dim=DIM, heads=HEADS, n_blocks=64),
                SinkhornSelfAttention(dim=DIM, bucket_size=n // 64, max_seq_len=n, heads=HEADS), x))
    from routing_transformer.routing_transformer import KmeansAttention
    kmeans = KmeansAttention(num_clusters=128, window_size=n // 128, num_heads=HEADS,
                             head_dim=DIM // HEADS)
    out.append(("routing-transformer", "128 clusters",
                zoo.create("routing-transformer", dim=DIM, heads=HEADS, n_clusters=128),
                Projected(lambda q, k, v: kmeans(q, k, v)[0]), x))
    from axial_attention import AxialAttention
    axial = AxialAttention(dim=DIM, num_dimensions=2, heads=HEADS, dim_index=-1)
    out.append(("axial-attention", f"{side} x {side} grid",
                zoo.create("axial-attention", dim=DIM, heads=HEADS, width=side),
                lambda t: axial(t.reshape(1, side, side, DIM)).reshape(1, -1, DIM),
                torch.randn(1, side * side, DIM)))
    return out


def timed_pair(ours, theirs, x, repeats):
    """Median times of the two, after a warm-up each, their passes interleaved so that a slow
    stretch of the machine falls on both."""
    times = ([], [])
    with torch.no_grad():
        ours(x), theirs(x)
        for _ in range(repeats):
            for fn, out in zip((ours, theirs), times, strict=True):
                start = time.perf_counter()
                fn(x)
                out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for n in args.n:
        for name, settings, ours, theirs, x in pairs(n):
            for m in (ours, theirs):
                if isinstance(m, nn.Module):
                    m.eval()
            t_ours, t_theirs = timed_pair(ours, theirs, x, args.repeats)
            rows.append({"entry": name, "n": n, "settings": settings, "ours_s": t_ours,
                         "public_s": t_theirs, "ratio": t_theirs / t_ours})
            print(f"{name:22s} n={n:6d}  ours {t_ours * 1e3:9.1f} ms  public {t_theirs * 1e3:9.1f} ms"
                  f"  public/ours {t_theirs / t_ours:5.2f}  ({settings})", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "dim": DIM, "heads": HEADS,
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    # glibc reads its tuning at start-up: run under the timing workers' setting of `zoo bench`
    if any(os.environ.get(key) != value for key, value in TIME_ENV.items() if key.startswith("MALLOC_")):
        os.execve(sys.executable, [sys.executable, *sys.argv], TIME_ENV)
    main()

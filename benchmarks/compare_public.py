"""Side-by-side time of zoo entries and public CPU implementations of the same mechanism, forward
and forward + backward, in the plain process a user has.

The public packages are NOT dependencies of the zoo: `make bench-public` installs lucidrains'
packages (without their dependencies' torch) into .cache/public and runs this script with that
folder on PYTHONPATH; the pure-PyTorch implementations in Hugging Face transformers (BigBird,
Longformer, Reformer, Nystromformer, Informer) come from the `hf` extra. Each pair is built with
matched hyper-parameters (listed in the output), timed in the same process, interleaved, median of
`--repeats` passes after a warm-up: forward without grad in eval mode, and forward + backward of
`sum()` in train mode with dropout at 0. A transformers attention module without its own output
projection gets a `Linear(dim, dim)` after it, so that both sides pay the same projections.

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
from zoo.verify.bench import machine, plain_env  # noqa: E402

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


class Then(nn.Module):
    """`module`'s first output (transformers' modules return tuples or output objects), then an
    output projection where the module has none."""

    def __init__(self, module, call, project: bool):
        super().__init__()
        self.module, self.call = module, call
        self.out = nn.Linear(DIM, DIM) if project else nn.Identity()

    def forward(self, x):
        return self.out(self.call(self.module, x))


def hf_pairs(n: int, x: torch.Tensor):
    """(entry, settings, ours, theirs, input) for the implementations in Hugging Face transformers."""
    out = []
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed (the hf extra): its implementations are skipped",
              file=sys.stderr)
        return out
    from transformers import BigBirdConfig, NystromformerConfig, ReformerConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel
    from transformers.models.informer.modeling_informer import InformerProbSparseAttention
    from transformers.models.longformer.modeling_longformer import LongformerConfig, LongformerSelfAttention
    from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    block = 64
    cfg = BigBirdConfig(hidden_size=DIM, num_attention_heads=HEADS, attention_type="block_sparse",
                        block_size=block, num_random_blocks=3, max_position_embeddings=n)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(1, n), block)
    out.append(("bigbird", "transformers BigBirdBlockSparseAttention; blocks of 64, 3 random, 2 global",
                zoo.create("bigbird", dim=DIM, heads=HEADS, block=block, random_blocks=3, max_len=n),
                Then(BigBirdBlockSparseAttention(cfg, seed=0),
                     lambda m, t: m(t, band, from_mask, to_mask, blocked, blocked)[0], True), x))
    lcfg = LongformerConfig(hidden_size=DIM, num_attention_heads=HEADS, attention_window=[128],
                            attention_probs_dropout_prob=0.0)
    local = torch.zeros(1, n)

    def longformer(m, t):
        return m(t, attention_mask=local, is_index_masked=local < 0, is_index_global_attn=local > 0,
                 is_global_attn=False)[0]

    out.append(("longformer", "transformers LongformerSelfAttention; window 128 (64 each side), "
                              "no global tokens",
                zoo.create("longformer", dim=DIM, heads=HEADS, window=64, global_tokens=0),
                Then(LongformerSelfAttention(lcfg, layer_id=0), longformer, True), x))
    rcfg = ReformerConfig(hidden_size=DIM, num_attention_heads=HEADS, attention_head_size=DIM // HEADS,
                          lsh_attn_chunk_length=64, num_hashes=2, num_buckets=n // 64,
                          is_decoder=False, max_position_embeddings=n, attn_layers=["lsh"],
                          lsh_attention_probs_dropout_prob=0.0, hash_seed=0)
    out.append(("reformer", f"transformers LSHSelfAttention; 2 rounds, {n // 64} buckets, chunks of 64",
                zoo.create("reformer", dim=DIM, heads=HEADS, n_hashes=2, n_buckets=n // 64,
                           chunk_size=64),
                Then(LSHSelfAttention(rcfg), lambda m, t: m(t).hidden_states, True), x))
    ncfg = NystromformerConfig(hidden_size=DIM, num_attention_heads=HEADS, num_landmarks=64,
                               segment_means_seq_len=n, attention_probs_dropout_prob=0.0)
    nystrom = NystromformerSelfAttention(ncfg)
    nystrom.conv_kernel_size = None  # the config insists on an int; ours has no conv residual
    del nystrom.conv
    out.append(("nystromformer", "transformers NystromformerSelfAttention; 64 landmarks, 6 pinv "
                                 "iterations, no conv",
                zoo.create("nystromformer", dim=DIM, heads=HEADS, landmarks=64, pinv_iters=6),
                Then(nystrom, lambda m, t: m(t)[0], True), x))
    out.append(("informer", "transformers InformerProbSparseAttention; sampling factor 5",
                zoo.create("informer", dim=DIM, heads=HEADS, factor=5),
                Then(InformerProbSparseAttention(DIM, HEADS, sampling_factor=5), lambda m, t: m(t)[0],
                     False), x))
    return out


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
    return out + hf_pairs(n, x)


def _pass(fn, x, backward: bool) -> None:
    if not backward:
        with torch.no_grad():
            fn(x)
        return
    fn(x).sum().backward()
    if isinstance(fn, nn.Module):
        fn.zero_grad(set_to_none=True)


def timed_pair(ours, theirs, x, repeats, backward: bool = False):
    """Median times of the two, after a warm-up each, their passes interleaved so that a slow
    stretch of the machine falls on both."""
    for m in (ours, theirs):
        if isinstance(m, nn.Module):
            m.train(backward)
    times: tuple[list[float], list[float]] = ([], [])
    _pass(ours, x, backward), _pass(theirs, x, backward)
    for _ in range(repeats):
        for fn, out in zip((ours, theirs), times, strict=True):
            start = time.perf_counter()
            _pass(fn, x, backward)
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*", help="entries to compare (default: all pairs)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for n in args.n:
        for name, settings, ours, theirs, x in pairs(n):
            if args.only and name not in args.only:
                continue
            row = {"entry": name, "n": n, "settings": settings}
            for key, backward in (("", False), ("_fb", True)):
                try:
                    t_ours, t_theirs = timed_pair(ours, theirs, x, args.repeats, backward)
                except Exception as err:  # noqa: BLE001 - a pair that fails is recorded, not fatal
                    row[f"error{key}"] = f"{type(err).__name__}: {str(err)[:200]}"
                    print(f"{name:22s} n={n:6d}  {'fwd+bwd' if backward else 'forward'} failed: "
                          f"{row[f'error{key}']}", flush=True)
                    continue
                row.update({f"ours{key}_s": t_ours, f"public{key}_s": t_theirs,
                            f"ratio{key}": t_theirs / t_ours})
                print(f"{name:22s} n={n:6d}  {'fwd+bwd' if backward else 'forward':7s}  ours "
                      f"{t_ours * 1e3:9.1f} ms  public {t_theirs * 1e3:9.1f} ms  public/ours "
                      f"{t_theirs / t_ours:5.2f}  ({settings})", flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({
            "machine": machine(), "dim": DIM, "heads": HEADS, "threads": torch.get_num_threads(),
            "environment": "plain process (glibc's defaults; no MALLOC_* variable, no LD_PRELOAD)",
            "passes": ["forward", "forward+backward"], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    # the plain process a user has: glibc reads its settings at start-up, so drop any inherited ones
    if any(k.startswith("MALLOC_") or k == "LD_PRELOAD" for k in os.environ):
        os.execve(sys.executable, [sys.executable, *sys.argv], plain_env())
    main()

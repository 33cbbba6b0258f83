"""Each zoo entry beside a public implementation of the same mechanism, in float64.

A *pair* builds both with the weights copied from the public module into ours (and their random
parts shared), runs both on the same input and returns `(ours, theirs)` outputs; `perturb=True`
adds 1e-3 to one of our weights after the copy, so that a test can show the comparison bites.
A *measure* returns the relative size of a difference as shipped, and of what is left of it once
its cause is removed: `(as_shipped, cause_removed)`; with `perturb=True` the second is run with
one of our weights moved, so that a test can show the "cause removed" comparison bites too.

The public packages are the optional extra `peers` (and transformers, the extra `hf`); each
function imports its package itself, so that a missing one skips only its own tests.
`zoo.site.peers` lists the pairs and differences that the documentation shows; the tests hold the
two in step, and `benchmarks/peers.py` writes the measured sizes to `benchmarks/peers.json`.
"""

from __future__ import annotations

import functools
import importlib
import math
from unittest import mock

import numpy as np
import torch
from einops import rearrange
from torch import nn

import zoo

DIM, HEADS, DIM_HEAD = 32, 2, 16
F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute value of `b`."""
    return float((a - b).abs().max() / b.abs().max())


def need(module: str):
    """Import `module`, or skip the calling test naming the package that is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - the extra is installed by `make test`
        import pytest

        pytest.skip(f"{module} cannot be imported ({err}); it comes with the extra `peers` "
                    "(transformers with the extra `hf`)")


def ours(entry: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return zoo.create(entry, **kw).double().eval()


@torch.no_grad()
def set_(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


@torch.no_grad()
def bump(param: torch.Tensor, perturb: bool) -> None:
    """The perturbed variant: one weight of ours moved by 1e-3."""
    if perturb:
        param.view(-1)[0] += 1e-3


def fused_qkv(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> torch.Tensor:
    return torch.cat([q.weight, k.weight, v.weight])


def x_seq(b: int = 2, n: int = 48) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, n, DIM, dtype=F64)


def padding(b: int, n: int, real: tuple[int, ...]) -> torch.Tensor:
    """`(b, n)` bool mask with the first `real[i]` tokens of sample i real."""
    return torch.arange(n) < torch.tensor(real)[:, None]


# ---------------------------------------------------------------- x-transformers

def x_transformers_pair(perturb=False, *, float32_softmax=False, causal=False):
    xt = need("x_transformers")
    torch.manual_seed(0)
    theirs = xt.x_transformers.Attention(DIM, dim_head=DIM_HEAD, heads=HEADS, causal=causal)
    theirs = theirs.double().eval()
    if not float32_softmax:  # the cause removed: their softmax in the input's dtype
        theirs.attend.attn_fn = functools.partial(torch.softmax, dim=-1)
    mine = ours("softmax-attention", dim=DIM, heads=HEADS, causal=causal)
    set_(mine.to_qkv.weight, fused_qkv(theirs.to_q, theirs.to_k, theirs.to_v))
    set_(mine.to_out.weight, theirs.to_out.weight)
    set_(mine.to_out.bias, torch.zeros(DIM))  # theirs has no output bias
    bump(mine.to_qkv.weight, perturb)
    x = x_seq()
    mask = padding(2, 48, (48, 31))
    with torch.no_grad():
        a, b = mine(x, mask=mask), theirs(x, mask=mask)
    return a[mask], b[mask]


def x_transformers_causal_pair(perturb=False):
    return x_transformers_pair(perturb, causal=True)


def x_transformers_float32(perturb=False):
    """Their softmax runs in float32 whatever the input's dtype."""
    return rel(*x_transformers_pair(float32_softmax=True)), rel(*x_transformers_pair(perturb))


# ---------------------------------------------------------------- performer-pytorch

def performer_pair(perturb=False, *, causal=False, eps=0.0):
    pp = need("performer_pytorch")
    mod = pp.performer_pytorch
    torch.manual_seed(0)
    theirs = mod.SelfAttention(DIM, heads=HEADS, dim_head=DIM_HEAD, nb_features=64, causal=causal)
    theirs = theirs.double().eval()
    fast = theirs.fast_attention
    kernel = functools.partial(mod.softmax_kernel, eps=eps)
    if causal:
        fast.causal_linear_fn = functools.partial(mod.causal_linear_attention_noncuda, eps=eps * 1e-2)
    mine = ours("performer", dim=DIM, heads=HEADS, features=64, causal=causal)
    set_(mine.projection, fast.projection_matrix.expand(HEADS, -1, -1))
    set_(mine.to_qkv.weight, fused_qkv(theirs.to_q, theirs.to_k, theirs.to_v))
    set_(mine.to_out.weight, theirs.to_out.weight)
    set_(mine.to_out.bias, theirs.to_out.bias)
    bump(mine.to_qkv.weight, perturb)
    x = x_seq()
    # FastAttention looks the kernel up at every call
    with mock.patch.object(mod, "softmax_kernel", kernel), torch.no_grad():
        return mine(x), theirs(x)


def performer_causal_pair(perturb=False):
    return performer_pair(perturb, causal=True)


def performer_epsilon(perturb=False, *, causal=False):
    """Their 1e-4 added to every feature (and, causally, 1e-6 to the normaliser)."""
    shipped = rel(*performer_pair(causal=causal, eps=1e-4))
    removed = rel(*performer_pair(perturb, causal=causal, eps=0.0))
    return shipped, removed


def performer_causal_epsilon(perturb=False):
    return performer_epsilon(perturb, causal=True)


# ---------------------------------------------------------------- linformer

def linformer_pair(perturb=False):
    lf = need("linformer")
    torch.manual_seed(0)
    n, r = 48, 16
    theirs = lf.LinformerSelfAttention(DIM, seq_len=n, k=r, heads=HEADS).double().eval()
    mine = ours("linformer", dim=DIM, heads=HEADS, max_len=n, r=r)
    set_(mine.to_qkv.weight, fused_qkv(theirs.to_q, theirs.to_k, theirs.to_v))
    set_(mine.to_out.weight, theirs.to_out.weight)
    set_(mine.to_out.bias, theirs.to_out.bias)
    # theirs: one (n, k) projection shared by all heads; ours: (h, r, n)
    set_(mine.proj_k, theirs.proj_k.T.expand(HEADS, -1, -1))
    set_(mine.proj_v, theirs.proj_v.T.expand(HEADS, -1, -1))
    bump(mine.proj_k, perturb)
    x = x_seq(n=n)
    with torch.no_grad():
        return mine(x), theirs(x)


# ---------------------------------------------------------------- nystrom-attention

def nystrom_pair(perturb=False, *, b=1, heads=1, per_matrix_pinv=False, mask=False):
    na = need("nystrom_attention")
    mod = na.nystrom_attention
    torch.manual_seed(0)
    n, m = 48, 8
    theirs = mod.NystromAttention(DIM, dim_head=DIM_HEAD, heads=heads, num_landmarks=m,
                                  pinv_iterations=6, residual=False).double().eval()
    theirs.eps = 0.0  # their 1e-8 added to each landmark's token count
    mine = ours("nystromformer", dim=DIM, heads=heads, dim_head=DIM_HEAD, landmarks=m)
    set_(mine.to_qkv.weight, theirs.to_qkv.weight)
    set_(mine.to_out.weight, theirs.to_out[0].weight)
    set_(mine.to_out.bias, theirs.to_out[0].bias)
    bump(mine.to_qkv.weight, perturb)
    x = x_seq(b=b, n=n)
    # every segment of 6 keeps a real token, so that no landmark is empty (theirs divides by 0)
    keep = padding(b, n, (n, 44)[:b] if b > 1 else (44,)) if mask else None
    from zoo.entries.nystromformer import iterative_pinv

    pinv = iterative_pinv if per_matrix_pinv else mod.moore_penrose_iter_pinv
    with mock.patch.object(mod, "moore_penrose_iter_pinv", pinv), torch.no_grad():
        a, c = mine(x, mask=keep), theirs(x, mask=keep)
    return (a, c) if keep is None else (a[keep], c[keep])


def nystrom_masked_pair(perturb=False):
    return nystrom_pair(perturb, mask=True)


def nystrom_batch_pinv(perturb=False):
    """Their pseudo-inverse starts from one scale over the whole batch and all heads."""
    shipped = rel(*nystrom_pair(b=2, heads=2))
    removed = rel(*nystrom_pair(perturb, b=2, heads=2, per_matrix_pinv=True))
    return shipped, removed


# ---------------------------------------------------------------- kronecker-attention-pytorch

def kronecker_pair(perturb=False, *, bias=False):
    ka = need("kronecker_attention_pytorch")
    torch.manual_seed(0)
    theirs = ka.KroneckerSelfAttention(DIM, heads=HEADS, dim_heads=DIM_HEAD).double().eval()
    if not bias:
        with torch.no_grad():
            theirs.to_out.bias.zero_()
    mine = ours("kronecker-attention", dim=DIM, heads=HEADS, dim_head=DIM_HEAD)
    w = theirs.to_qkv.weight[..., 0]  # (3 inner, dim)
    inner = HEADS * DIM_HEAD
    set_(mine.to_q.weight, w[:inner])
    set_(mine.to_kv.weight, w[inner:])
    set_(mine.to_out.weight, theirs.to_out.weight[..., None])
    set_(mine.to_out.bias, theirs.to_out.bias)
    bump(mine.to_q.weight, perturb)
    torch.manual_seed(1)
    x = torch.randn(2, DIM, 6, 7, dtype=F64)
    with torch.no_grad():
        return mine(x), theirs(x)


def kronecker_double_bias(perturb=False):
    """Their output bias is added to the row and to the column summaries, so twice."""
    return rel(*kronecker_pair(bias=True)), rel(*kronecker_pair(perturb, bias=False))


# ---------------------------------------------------------------- aft-pytorch

def _aft_pair(perturb, variant):
    aft = need("aft_pytorch")
    torch.manual_seed(0)
    n = 24
    cls = {"full": aft.AFTFull, "simple": aft.AFTSimple}[variant]
    theirs = cls(max_seqlen=n, dim=DIM, hidden_dim=DIM).double().eval()
    with torch.no_grad():  # ours has no q/k/v bias; theirs at 0
        for lin in (theirs.to_q, theirs.to_k, theirs.to_v):
            lin.bias.zero_()
    mine = ours("attention-free-transformer", dim=DIM, heads=1, variant=variant, max_len=n)
    set_(mine.to_qkv.weight, fused_qkv(theirs.to_q, theirs.to_k, theirs.to_v))
    set_(mine.to_out.weight, theirs.project.weight)
    set_(mine.to_out.bias, theirs.project.bias)
    if variant == "full":
        set_(mine.w, theirs.wbias[None])
    bump(mine.to_qkv.weight, perturb)
    x = x_seq(n=n)
    with torch.no_grad():
        return mine(x), theirs(x)


def aft_full_pair(perturb=False):
    return _aft_pair(perturb, "full")


def aft_simple_pair(perturb=False):
    return _aft_pair(perturb, "simple")


# ---------------------------------------------------------------- lambda-networks

def lambda_pair(perturb=False):
    """Their 2-d layer on a one-row image is our 1-d one: the position convolution's middle row is
    our scope embedding; their batch norms (eval, fresh statistics, eps 0) are the identity."""
    ln = need("lambda_networks")
    torch.manual_seed(0)
    n, heads, dim_key, scope = 40, 4, 8, 5
    theirs = ln.LambdaLayer(DIM, dim_k=dim_key, r=scope, heads=heads).double().eval()
    with torch.no_grad():
        theirs.pos_conv.bias.zero_()  # a bias on the position lambdas, which ours has not
    for norm in (theirs.norm_q, theirs.norm_v):
        norm.eps = 0.0
    mine = ours("lambda-networks", dim=DIM, heads=heads, dim_key=dim_key, scope=scope)
    convs = (theirs.to_q, theirs.to_k, theirs.to_v)
    set_(mine.to_qkv.weight, torch.cat([c.weight[:, :, 0, 0] for c in convs]))
    set_(mine.to_out.weight, torch.eye(DIM))  # theirs has no output projection
    set_(mine.to_out.bias, torch.zeros(DIM))
    set_(mine.emb, theirs.pos_conv.weight[:, 0, 0, scope // 2].T)  # (k, r) -> (r, k)
    bump(mine.to_qkv.weight, perturb)
    x = x_seq(n=n)
    with torch.no_grad():
        image = rearrange(x, "b n c -> b c 1 n")
        return mine(x), rearrange(theirs(image), "b c 1 n -> b n c")


# ---------------------------------------------------------------- product-key-memory

def pkm_pair(perturb=False, *, query_norm=False):
    pk = need("product_key_memory")
    torch.manual_seed(0)
    heads, num_keys, topk, half = 2, 16, 4, 8
    theirs = pk.PKM(DIM, heads=heads, num_keys=num_keys, topk=topk, dim_head=half).double().eval()
    if not query_norm:  # the cause removed: their LayerNorm of each query half
        theirs.norm = nn.Identity()
    mine = ours("product-key-memory", dim=DIM, heads=heads, num_keys=num_keys, topk=topk,
                dim_key=2 * half)
    w = rearrange(theirs.to_queries.weight, "(p h d) c -> (h p d) c", p=2, h=heads)
    set_(mine.to_queries.weight, w)
    set_(mine.keys, rearrange(theirs.keys, "h n p d -> p h n d"))
    set_(mine.values, theirs.values.weight)
    bump(mine.values, perturb)
    x = x_seq(n=32)
    with torch.no_grad():
        return mine(x), theirs(x)


def pkm_query_norm(perturb=False):
    """Their queries go through a LayerNorm (per half and head) before the key search."""
    return rel(*pkm_pair(query_norm=True)), rel(*pkm_pair(perturb))


# ---------------------------------------------------------------- fast-transformer-pytorch

def _pool_raw_keys(q, k, v, w_q, w_k, mask=None):
    """Their second pool: weights from the query-weighted keys, as ours, but summing the raw keys."""
    from zoo.entries.fastformer import additive_pool

    global_q = additive_pool(q, w_q, mask)
    scores = torch.einsum("bhnd,hd->bhn", global_q * k, w_k) * k.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], torch.finfo(k.dtype).min)
    global_k = torch.einsum("bhn,bhnd->bhd", scores.softmax(dim=-1), k)[:, :, None]
    return global_k * v


def _fastformer(perturb=False, *, raw_keys=True):
    ft = need("fast_transformer_pytorch")
    torch.manual_seed(0)
    theirs = ft.fast_transformer_pytorch.FastAttention(DIM, heads=HEADS, dim_head=DIM_HEAD)
    theirs = theirs.double().eval()
    mine = ours("fastformer", dim=DIM, heads=HEADS, dim_head=DIM_HEAD)
    set_(mine.to_qkv.weight, theirs.to_qkv.weight)
    set_(mine.w_q, theirs.to_q_attn_logits.weight.expand(HEADS, -1))  # theirs: shared by heads
    set_(mine.w_k, theirs.to_k_attn_logits.weight.expand(HEADS, -1))
    set_(mine.to_r.weight, torch.block_diag(*[theirs.to_r.weight] * HEADS))  # theirs: per head
    set_(mine.to_r.bias, theirs.to_r.bias.repeat(HEADS))
    set_(mine.to_out.weight, theirs.to_out.weight)
    set_(mine.to_out.bias, theirs.to_out.bias)
    bump(mine.to_qkv.weight, perturb)
    x = x_seq()
    mask = padding(2, 48, (48, 37))
    from zoo.entries import fastformer

    # the cause removed: ours summing their raw keys
    attend = _pool_raw_keys if raw_keys else fastformer.fastformer_attention
    with mock.patch.object(fastformer, "fastformer_attention", attend), torch.no_grad():
        a, b = mine(x, mask=mask), theirs(x, mask=mask)
    return a[mask], b[mask]


def fastformer_raw_keys(perturb=False):
    """Their global key pools the raw keys where the paper pools the query-weighted ones."""
    return rel(*_fastformer(raw_keys=False)), rel(*_fastformer(perturb))


# ---------------------------------------------------------------- transformers: BigBird

def bigbird_pair(perturb=False, *, training=True):
    """transformers' block-sparse attention (ITC: first and last block global) in training mode,
    its random blocks (numpy, seeded) recorded and handed to ours as `global_at="ends"` sees them:
    the blocks rolled by one, so that block c of theirs is block (c + 1) % nb of ours."""
    bb = need("transformers.models.big_bird.modeling_big_bird")
    n, block, r = 64, 4, 2  # theirs needs n > (5 + 2 r) block (else their models run full)
    nb = n // block
    config = bb.BigBirdConfig(hidden_size=DIM, num_attention_heads=HEADS, block_size=block,
                              num_random_blocks=r, use_bias=False, max_position_embeddings=n,
                              attention_type="block_sparse")
    torch.manual_seed(0)
    theirs = bb.BigBirdBlockSparseAttention(config, seed=3).double().train(training)
    mine = ours("bigbird", dim=DIM, heads=HEADS, block=block, global_blocks=2, random_blocks=r,
                max_len=n, global_at="ends")
    set_(mine.to_qkv.weight, fused_qkv(theirs.query, theirs.key, theirs.value))
    set_(mine.to_out.weight, torch.eye(DIM))  # theirs stops before the output projection
    set_(mine.to_out.bias, torch.zeros(DIM))
    bump(mine.to_qkv.weight, perturb)
    drawn = []
    record = theirs._bigbird_block_rand_mask_with_head

    def recorded(*args, **kw):
        drawn.append(record(*args, **kw))
        return drawn[-1]

    x = x_seq(n=n)
    keep = padding(2, n, (n, 53))
    masks = bb.BigBirdModel.create_masks_for_block_sparse_attn(keep.double(), block)
    blocked, band, from_mask, to_mask = masks
    with mock.patch.object(theirs, "_bigbird_block_rand_mask_with_head", recorded), torch.no_grad():
        c = theirs(x, band_mask=band, from_mask=from_mask, to_mask=to_mask,
                   from_blocked_mask=blocked, to_blocked_mask=blocked)[0]
        rand = torch.as_tensor(np.stack(drawn[0]), dtype=torch.long)  # (h, nb-2, r)
        table = torch.full((HEADS, nb, r), -1, dtype=torch.long)
        if training:  # their query blocks 1 .. nb-2 are ours 2 .. nb-1
            table[:, 2:] = (rand + 1) % nb
        # in eval mode their indices are all 0: the global block 0, already in every S(B), so
        # ours reads no random block (a set has each key once)
        with mock.patch.object(mine, "random", lambda length: table):
            a = mine(x, mask=keep)
    return a[keep], c[keep]


def bigbird_eval_zero_blocks(perturb=False):
    """In eval mode theirs takes block 0 as every random block (all-zero indices), so block 0
    enters each middle row's softmax r + 1 times; in training mode the two agree."""
    return rel(*bigbird_pair(training=False)), rel(*bigbird_pair(perturb))


# ---------------------------------------------------------------- transformers: Longformer

_SOFTMAX = torch.nn.functional.softmax


def _softmax_in_input_dtype(x, dim=None, dtype=None, **kw):
    """torch's softmax with the `dtype=float32` that theirs passes left out (the cause removed)."""
    return _SOFTMAX(x, dim=dim, **kw)


def longformer_pair(perturb=False, *, float32_softmax=False):
    lf = need("transformers.models.longformer.modeling_longformer")
    n, window, g = 64, 8, 2
    config = lf.LongformerConfig(hidden_size=DIM, num_attention_heads=HEADS, attention_window=[window],
                                 attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    theirs = lf.LongformerSelfAttention(config, layer_id=0).double().eval()
    with torch.no_grad():  # ours has no q/k/v biases
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            getattr(theirs, name).bias.zero_()
    mine = ours("longformer", dim=DIM, heads=HEADS, window=window, global_tokens=g)
    set_(mine.to_qkv.weight, fused_qkv(theirs.query, theirs.key, theirs.value))
    set_(mine.to_qkv_global.weight, fused_qkv(theirs.query_global, theirs.key_global, theirs.value_global))
    set_(mine.to_out.weight, torch.eye(DIM))  # theirs stops before the output projection
    set_(mine.to_out.bias, torch.zeros(DIM))
    bump(mine.to_qkv_global.weight, perturb)
    x = x_seq(n=n)
    keep = padding(2, n, (n, 45))
    marks = torch.where(keep, 0.0, -10000.0).double()
    marks[:, :g] = 10000.0  # their mask: -10000 padded, 0 local, +10000 global
    softmax = _SOFTMAX if float32_softmax else _softmax_in_input_dtype
    with mock.patch.object(lf.nn.functional, "softmax", softmax), torch.no_grad():
        c = theirs(x, attention_mask=marks, is_index_masked=marks < 0,
                   is_index_global_attn=marks > 0, is_global_attn=True)[0]
        a = mine(x, mask=keep)
    return a[keep], c[keep]


def longformer_float32(perturb=False):
    """Their softmax runs in float32 whatever the input's dtype."""
    return rel(*longformer_pair(float32_softmax=True)), rel(*longformer_pair(perturb))


# ---------------------------------------------------------------- transformers: Nystromformer

def hf_nystrom_pair(perturb=False, *, b=1, heads=1, per_matrix_pinv=False):
    ny = need("transformers.models.nystromformer.modeling_nystromformer")
    n, m = 48, 8
    config = ny.NystromformerConfig(hidden_size=DIM, num_attention_heads=heads, num_landmarks=m,
                                    segment_means_seq_len=n, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    theirs = ny.NystromformerSelfAttention(config).double().eval()
    theirs.conv_kernel_size = None  # no residual convolution (their config takes only an int)
    with torch.no_grad():  # ours has no q/k/v biases
        for lin in (theirs.query, theirs.key, theirs.value):
            lin.bias.zero_()
    mine = ours("nystromformer", dim=DIM, heads=heads, landmarks=m)
    set_(mine.to_qkv.weight, fused_qkv(theirs.query, theirs.key, theirs.value))
    set_(mine.to_out.weight, torch.eye(DIM))  # theirs stops before the output projection
    set_(mine.to_out.bias, torch.zeros(DIM))
    bump(mine.to_qkv.weight, perturb)
    x = x_seq(b=b, n=n)
    from zoo.entries.nystromformer import iterative_pinv

    pinv = (lambda mat, n_iter=6: iterative_pinv(mat, n_iter)) if per_matrix_pinv else theirs.iterative_inv
    with mock.patch.object(theirs, "iterative_inv", pinv), torch.no_grad():
        return mine(x), theirs(x)[0]


def hf_nystrom_batch_pinv(perturb=False):
    """Their pseudo-inverse starts from one scale over the whole batch and all heads."""
    return (rel(*hf_nystrom_pair(b=2, heads=2)),
            rel(*hf_nystrom_pair(perturb, b=2, heads=2, per_matrix_pinv=True)))


# ---------------------------------------------------------------- transformers: Informer

def informer_pair(perturb=False, *, n=48, log1p=False):
    """Their one key sample, n keys drawn with replacement for all queries, handed to ours as one
    block of n queries (ours draws c ceil(ln n) keys per block of 64). `log1p`: ours counting its
    active queries as theirs do, c ceil(ln(1 + n))."""
    inf = need("transformers.models.informer.modeling_informer")
    factor = 5
    torch.manual_seed(0)
    theirs = inf.InformerProbSparseAttention(DIM, HEADS, sampling_factor=factor, bias=False)
    theirs = theirs.double().eval()
    mine = ours("informer", dim=DIM, heads=HEADS, factor=factor, block=n)
    set_(mine.to_qkv.weight, fused_qkv(theirs.q_proj, theirs.k_proj, theirs.v_proj))
    set_(mine.to_out.weight, theirs.out_proj.weight)
    set_(mine.to_out.bias, torch.zeros(DIM))
    bump(mine.to_qkv.weight, perturb)
    x = x_seq(n=n)
    torch.manual_seed(5)
    sample = torch.randint(0, n, (n,))  # their draw: the first random call of their forward
    from zoo.entries import informer

    def with_their_sample(q, k, v, _sample, mask=None, **kw):
        return attend(q, k, v, sample[None], mask, **kw)

    def their_count(length, c):
        return min(length, c * math.ceil(math.log1p(length)))

    attend = informer.probsparse_attention
    count = their_count if log1p else informer.sample_size
    with mock.patch.object(informer, "probsparse_attention", with_their_sample), \
            mock.patch.object(informer, "sample_size", count), torch.no_grad():
        a = mine(x)
        torch.manual_seed(5)
        c = theirs(x)[0]
    return a, c


def informer_log1p(perturb=False):
    """Their number of active queries is c ceil(ln(1 + n)), the paper's c ceil(ln n): at n = 20,
    20 active queries (all) where ours has 15."""
    return rel(*informer_pair(n=20)), rel(*informer_pair(perturb, n=20, log1p=True))


# ---------------------------------------------------------------- transformers: Reformer

def reformer_pair(perturb=False, *, causal=False, scale=1.0, norm_eps=0.0):
    """Their LSH layer with one chunk holding the whole sequence (their standard self-attention
    path: every key, own position excluded) beside ours with one bucket and one chunk: the
    projections, key normalisation, temperature and self-exclusion, not the hashing."""
    rf = need("transformers.models.reformer.modeling_reformer")
    n = 40
    config = rf.ReformerConfig(hidden_size=DIM, num_attention_heads=HEADS, attention_head_size=DIM_HEAD,
                               num_buckets=2, num_hashes=1, lsh_attn_chunk_length=n,
                               lsh_num_chunks_before=0, lsh_num_chunks_after=0, is_decoder=causal,
                               lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=n)
    torch.manual_seed(0)
    theirs = rf.LSHSelfAttention(config).double().eval()
    mine = ours("reformer", dim=DIM, heads=HEADS, dim_head=DIM_HEAD, n_hashes=1, n_buckets=1,
                chunk_size=n, causal=causal, scale=scale)
    set_(mine.to_qv.weight, torch.cat([theirs.query_key.weight, theirs.value.weight]))
    set_(mine.to_out.weight, torch.eye(DIM))  # theirs stops before the output projection
    set_(mine.to_out.bias, torch.zeros(DIM))
    bump(mine.to_qv.weight, perturb)
    x = x_seq(n=n)
    keep = padding(2, n, (n, 29))
    norm = functools.partial(type(theirs)._len_norm, theirs, epsilon=norm_eps)
    with mock.patch.object(theirs, "_len_norm", norm), torch.no_grad():
        c = theirs(x, attention_mask=keep.long()).hidden_states
        a = mine(x, mask=keep)
    return a[keep], c[keep]


def reformer_causal_pair(perturb=False):
    return reformer_pair(perturb, causal=True)


def reformer_temperature(perturb=False):
    """Theirs does not divide the scores by sqrt(d) (ours, by default, as the paper writes)."""
    return rel(*reformer_pair(scale=None)), rel(*reformer_pair(perturb))


def reformer_norm_epsilon(perturb=False):
    """Their key normalisation adds 1e-6 to the mean square of each key."""
    return rel(*reformer_pair(norm_eps=1e-6)), rel(*reformer_pair(perturb))


# ---------------------------------------------------------------- local-attention

def _local_pair(perturb, entry, their_kw, *, causal=False, **ours_kw):
    """Attention on given q, k, v (no weights on their side): ours' `attend` beside their
    `LocalAttention`; the planted defect moves one entry of one of our queries."""
    la = need("local_attention")
    theirs = la.LocalAttention(**their_kw, causal=causal, dropout=0.0, use_rotary_pos_emb=False)
    mine = ours(entry, dim=DIM, heads=HEADS, causal=causal, **ours_kw)
    torch.manual_seed(1)
    n = 48
    q, k, v = torch.randn(3, 2, HEADS, n, DIM_HEAD, dtype=F64)
    keep = padding(2, n, (n, 37))
    mine_q = q.clone()
    bump(mine_q[0, 0, 10], perturb)  # a query that sees several keys, causal or not
    with torch.no_grad():
        a, c = mine.attend(mine_q, k, v, keep), theirs(q, k, v, mask=keep)
    real = keep[:, None].expand(-1, HEADS, -1)
    return a[real], c[real]


def local_window_pair(perturb=False, *, causal=False):
    """Their exact window of 4 blocks each way: our Longformer window 8 with no global tokens."""
    return _local_pair(perturb, "longformer", dict(window_size=4, look_backward=1,
                                                   look_forward=0 if causal else 1, exact_windowsize=True),
                       causal=causal, window=8, global_tokens=0)


def local_window_causal_pair(perturb=False):
    return local_window_pair(perturb, causal=True)


def local_block_pair(perturb=False):
    """Their blocks with no look-around: our memory-compressed attention's local kind."""
    return _local_pair(perturb, "memory-compressed-attention",
                       dict(window_size=8, look_backward=0, look_forward=0), kind="local", block=8)


# ---------------------------------------------------------------- linear-attention-transformer

def lat_pair(perturb=False, *, folded=True):
    """Their global heads are efficient attention with the queries, after their softmax, times
    d^-1/2: the factor folded into our output projection (`folded`)."""
    lt = need("linear_attention_transformer")
    torch.manual_seed(0)
    theirs = lt.linear_attention_transformer.SelfAttention(DIM, HEADS, dim_head=DIM_HEAD)
    theirs = theirs.double().eval()
    mine = ours("efficient-attention", dim=DIM, heads=HEADS, dim_head=DIM_HEAD)
    set_(mine.to_qkv.weight, fused_qkv(theirs.to_q, theirs.to_k, theirs.to_v))
    set_(mine.to_out.weight, theirs.to_out.weight * (DIM_HEAD ** -0.5 if folded else 1.0))
    set_(mine.to_out.bias, theirs.to_out.bias)
    bump(mine.to_qkv.weight, perturb)
    x = x_seq()
    keep = padding(2, 48, (48, 33))
    with torch.no_grad():
        a, c = mine(x, mask=keep), theirs(x, input_mask=keep.clone())
    return a[keep], c[keep]


def lat_query_scale(perturb=False):
    """Their queries are multiplied by d^-1/2 after the feature softmax (the paper has no factor)."""
    return rel(*lat_pair(folded=False)), rel(*lat_pair(perturb))


# ---------------------------------------------------------------- axial-attention

def axial_pair(perturb=False):
    """Their layer run sequentially (sum_axial_out=False) attends along the first grid axis, then
    the second: on the transposed grid that is our rows, then our columns."""
    ax = need("axial_attention")
    torch.manual_seed(0)
    rows, width = 5, 7
    theirs = ax.AxialAttention(DIM, num_dimensions=2, heads=HEADS, dim_index=-1, sum_axial_out=False)
    theirs = theirs.double().eval()
    first, second = (p.fn for p in theirs.axial_attentions)
    mine = ours("axial-attention", dim=DIM, heads=HEADS, width=width)
    for qkv, out, fn in ((mine.to_qkv, mine.to_out, first), (mine.to_qkv_column, mine.to_out_column, second)):
        set_(qkv.weight, torch.cat([fn.to_q.weight, fn.to_kv.weight]))
        set_(out.weight, fn.to_out.weight)
        set_(out.bias, fn.to_out.bias)
    bump(mine.to_qkv_column.weight, perturb)
    x = x_seq(n=rows * width)
    grid = rearrange(x, "b (r c) d -> b c r d", c=width)  # transposed: their first axis is our row
    with torch.no_grad():
        return mine(x), rearrange(theirs(grid), "b c r d -> b (r c) d")


# ---------------------------------------------------------------- memory-compressed-attention

def _mca(perturb=False, *, null_slot=True):
    """One head (their scale d^-1/2 takes the model width: one head makes it the head width),
    n a multiple of c (theirs pads at the front); their one convolution for keys and values copied
    into both of ours. `null_slot`: ours given their empty key/value slot (the cause removed)."""
    need("memory_compressed_attention")
    from memory_compressed_attention import MemoryCompressedAttention as Theirs

    from zoo.entries import memory_compressed_attention as mca

    torch.manual_seed(0)
    c = 3
    theirs = Theirs(DIM, heads=1, compression_factor=c).double().eval()
    mine = ours("memory-compressed-attention", dim=DIM, heads=1, compression=c)
    set_(mine.to_qkv.weight, theirs.to_qkv.weight)
    set_(mine.to_out.weight, theirs.to_out.weight)
    set_(mine.to_out.bias, theirs.to_out.bias)
    for conv in (mine.compress_k, mine.compress_v):
        set_(conv.weight, theirs.compress_fn.conv.weight)
        set_(conv.bias, theirs.compress_fn.conv.bias)
    bump(mine.to_qkv.weight, perturb)
    attend = mca.compressed_attention

    def with_null_slot(q, k, v, mask=None, **kw):
        k, v = (torch.cat([t.new_zeros(*t.shape[:2], 1, t.shape[3]), t], dim=2) for t in (k, v))
        mask = None if mask is None else torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        return attend(q, k, v, mask, **kw)

    x = x_seq(n=48)
    with mock.patch.object(mca, "compressed_attention", with_null_slot if null_slot else attend), \
            torch.no_grad():
        return mine(x), theirs(x)


def mca_null_slot(perturb=False):
    """Theirs always adds an empty key/value slot (a zero key: score 0, weight e^0, value 0)."""
    return rel(*_mca(null_slot=False)), rel(*_mca(perturb))


# ---------------------------------------------------------------- isab-pytorch

def _attention_only(self, x, y, mask=None):
    """Our MAB without its residual, LayerNorms and feed-forward: the attention and its output
    projection only, as their `Attention`."""
    from zoo.core.softmax import softmax_attention

    q = rearrange(self.to_q(x), "b i (h d) -> b h i d", h=self.heads)
    k, v = rearrange(self.to_kv(y), "b j (two h d) -> two b h j d", two=2, h=self.heads)
    return self.to_out(rearrange(softmax_attention(q, k, v, mask), "b h i e -> b i (h e)"))


def _isab(perturb=False, *, attention_only=True):
    ip = need("isab_pytorch")
    from zoo.entries import set_transformer

    torch.manual_seed(0)
    m = 6
    theirs = ip.ISAB(dim=DIM, heads=HEADS, num_latents=m).double().eval()
    mine = ours("set-transformer", dim=DIM, heads=HEADS, dim_head=64, inducing=m)  # their width
    set_(mine.inducing_points, theirs.latents)
    for mab, attn in ((mine.summarise, theirs.attn1), (mine.broadcast, theirs.attn2)):
        set_(mab.to_q.weight, attn.to_q.weight)
        set_(mab.to_kv.weight, attn.to_kv.weight)
        set_(mab.to_out.weight, attn.to_out.weight)
        set_(mab.to_out.bias, torch.zeros(DIM))  # theirs has no output bias
    bump(mine.inducing_points, perturb)
    x = x_seq(n=40)
    keep = padding(2, 40, (40, 27))
    forward = _attention_only if attention_only else set_transformer.MAB.forward
    with mock.patch.object(set_transformer.MAB, "forward", forward), torch.no_grad():
        a, c = mine(x, mask=keep), theirs(x, mask=keep)[0]
    return a[keep], c[keep]


def isab_attention_only(perturb=False):
    """Their blocks are the attention alone: no residual, LayerNorm or feed-forward (the paper's
    MAB, eq. 6-7, has them, and so has ours)."""
    return rel(*_isab(attention_only=False)), rel(*_isab(perturb))


def _reformer_lsh(perturb=False, *, as_ours=True):
    """Their LSH path (one round, one head of 32, 4 buckets, chunks of 8, one chunk back) and
    ours with scale=1.0 and their rotation. `as_ours`: their mask also refuses keys of another
    bucket (their first chunk's look-back, which wraps to the last chunk, then reads nothing: the
    sorted first and last chunks hold different buckets)."""
    rf = need("transformers.models.reformer.modeling_reformer")
    n, c, nb, d, seed = 48, 8, 4, 32, 7
    config = rf.ReformerConfig(hidden_size=DIM, num_attention_heads=1, attention_head_size=d,
                               num_buckets=nb, num_hashes=1, lsh_attn_chunk_length=c,
                               lsh_num_chunks_before=1, lsh_num_chunks_after=0, hash_seed=seed,
                               lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=n)
    torch.manual_seed(0)
    theirs = rf.LSHSelfAttention(config).double().eval()
    mine = ours("reformer", dim=DIM, heads=1, dim_head=d, n_hashes=1, n_buckets=nb, chunk_size=c,
                scale=1.0)
    torch.manual_seed(seed)  # their rotation: drawn after seeding, at every call
    set_(mine.rotations, torch.randn(1, d, 1, nb // 2, dtype=F64)[0].permute(1, 0, 2))
    set_(mine.to_qv.weight, torch.cat([theirs.query_key.weight, theirs.value.weight]))
    set_(mine.to_out.weight, torch.eye(DIM))
    set_(mine.to_out.bias, torch.zeros(DIM))
    bump(mine.to_qv.weight, perturb)
    hashed, compute_mask = [], theirs._compute_attn_mask

    def record(*args, **kw):
        hashed.append(rf.LSHSelfAttention._hash_vectors(theirs, *args, **kw))
        return hashed[-1]

    def also_buckets(query_idx, key_idx, attention_mask, shape, standard):
        keep = compute_mask(query_idx, key_idx, attention_mask, shape, standard)
        buckets = hashed[-1][:, :, None, :].expand(*query_idx.shape[:3], -1)
        same = buckets.gather(-1, query_idx)[..., :, None] == buckets.gather(-1, key_idx)[..., None, :]
        return same if keep is None else keep & same

    x = x_seq(n=n)
    mask_fn = also_buckets if as_ours else compute_mask
    with mock.patch.object(theirs, "_hash_vectors", record), \
            mock.patch.object(theirs, "_compute_attn_mask", mask_fn), \
            mock.patch.object(theirs, "_len_norm", functools.partial(type(theirs)._len_norm, theirs,
                                                                    epsilon=0.0)), torch.no_grad():
        return mine(x), theirs(x).hidden_states


def reformer_other_buckets(perturb=False):
    """Their chunks read keys of other buckets; ours do not (equal once their mask refuses them)."""
    return rel(*_reformer_lsh(as_ours=False)), rel(*_reformer_lsh(perturb))

"""Compared with other implementations: what the site says about each public implementation.

Two tables, both checked by `tests/peers/test_peers.py` against the comparisons themselves
(`tests/peers/pairs.py`, weights copied into ours, float64):

- `PAIRS`: an entry and a public implementation set up to compute the same function, with the
  tolerance the test holds them to (and fails when one weight is moved);
- `DIFFERENCES`: a difference as the public package ships it, with its cause; the test measures it
  as shipped (it must be there) and with the cause removed (then the two must agree).

The sizes the pages print come from `benchmarks/peers.json`, written by `benchmarks/peers.py`
(`make peers`); the tests check that the committed numbers are the ones measured now.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoo.catalog import Entry

TRANSFORMERS = "transformers==5.23.0"


@dataclass(frozen=True)
class Pair:
    entry: str
    peer: str           # the package, pinned as in the extra `peers` (or `hf`)
    module: str         # the public class compared
    function: str       # the comparison in tests/peers/pairs.py
    configuration: str  # what both are set to
    tolerance: float = 1e-12


@dataclass(frozen=True)
class Difference:
    entry: str
    peer: str
    function: str       # returns (as shipped, cause removed) in tests/peers/pairs.py
    cause: str
    ours: bool = False  # a convention of ours (the entry's docstring and notes name the peer)


PAIRS: tuple[Pair, ...] = (
    Pair("softmax-attention", "x-transformers==2.31.10", "x_transformers.Attention",
         "x_transformers_pair",
         "2 heads of 16, no output bias (theirs has none); a padding mask; their softmax in "
         "float64 (see the difference)"),
    Pair("softmax-attention", "x-transformers==2.31.10", "x_transformers.Attention",
         "x_transformers_causal_pair", "as above, causal"),
    Pair("performer", "performer-pytorch==1.1.4", "performer_pytorch.SelfAttention",
         "performer_pair", "64 features, their projection matrix copied into ours; their feature "
                           "epsilon set to 0"),
    Pair("performer", "performer-pytorch==1.1.4", "performer_pytorch.SelfAttention",
         "performer_causal_pair", "causal, otherwise as above (their non-CUDA prefix sums)"),
    Pair("linformer", "linformer==0.2.3", "linformer.LinformerSelfAttention", "linformer_pair",
         "n = 48, k = 16; their one projection shared by the heads, copied into each of ours"),
    Pair("nystromformer", "nystrom-attention==0.0.14", "nystrom_attention.NystromAttention",
         "nystrom_pair", "one matrix (batch 1, 1 head), 8 landmarks, 6 pseudo-inverse iterations, "
                         "no residual convolution, their landmark epsilon at 0"),
    Pair("nystromformer", "nystrom-attention==0.0.14", "nystrom_attention.NystromAttention",
         "nystrom_masked_pair", "as above with a padding mask (4 padded tokens, no landmark empty)"),
    Pair("nystromformer", TRANSFORMERS, "NystromformerSelfAttention", "hf_nystrom_pair",
         "one matrix (batch 1, 1 head), n = 48, 8 landmarks, no residual convolution, no mask; "
         "their q/k/v biases at 0, ours' output projection the identity"),
    Pair("kronecker-attention", "kronecker-attention-pytorch==0.0.6",
         "kronecker_attention_pytorch.KroneckerSelfAttention", "kronecker_pair",
         "a 6 x 7 image, their output bias at 0 (see the difference)"),
    Pair("attention-free-transformer", "aft-pytorch==0.2.2", "aft_pytorch.AFTFull", "aft_full_pair",
         "AFT-full, n = 24, their position biases copied, their q/k/v biases at 0 (ours has none)"),
    Pair("attention-free-transformer", "aft-pytorch==0.2.2", "aft_pytorch.AFTSimple",
         "aft_simple_pair", "AFT-simple, otherwise as above"),
    Pair("lambda-networks", "lambda-networks==0.4.0", "lambda_networks.LambdaLayer", "lambda_pair",
         "4 queries, |k| = 8, scope 5: their 2-d layer on a one-row image, the middle row of its "
         "position convolution as our scope embedding, its bias at 0; their batch norms in eval "
         "mode with fresh statistics and eps 0 (the identity); ours' output projection the "
         "identity (theirs has none)"),
    Pair("longformer", TRANSFORMERS, "LongformerSelfAttention", "longformer_pair",
         "window 8 (4 keys each side), the first 2 tokens global with their own projections, "
         "n = 64, a padding mask; their q/k/v biases at 0 (ours has none), ours' output "
         "projection the identity; their softmax in float64 (see the difference)"),
    Pair("informer", TRANSFORMERS, "InformerProbSparseAttention", "informer_pair",
         "n = 48, c = 5 (20 active queries on both sides); their one key sample (n keys drawn "
         "with replacement, shared by all queries, so their measurement is quadratic) handed to "
         "ours as one block of n queries; no mask; no q/k/v/output biases on either side"),
    Pair("reformer", TRANSFORMERS, "LSHSelfAttention", "reformer_pair",
         "ours with scale=1.0 (their temperature, see the difference), one round; one chunk "
         "holding the whole sequence (n = 40) on both sides, so theirs runs its standard "
         "self-attention path and ours has one bucket: this checks the projections, the key "
         "normalisation, the temperature, self-exclusion and the padding mask, not the hashing "
         "(see the differences for their chunks); their key-norm epsilon at 0; ours' output "
         "projection the identity"),
    Pair("reformer", TRANSFORMERS, "LSHSelfAttention", "reformer_causal_pair",
         "as above, causal (theirs: is_decoder=True)"),
    Pair("longformer", "local-attention==1.11.2", "local_attention.LocalAttention",
         "local_window_pair", "attention on the same q, k, v (theirs has no weights): their exact "
         "window of 4 each way (window_size 4, one block back and forward) as our window 8 with "
         "no global tokens; n = 48, a padding mask; no rotary embedding"),
    Pair("longformer", "local-attention==1.11.2", "local_attention.LocalAttention",
         "local_window_causal_pair", "as above, causal (4 keys back)"),
    Pair("memory-compressed-attention", "local-attention==1.11.2", "local_attention.LocalAttention",
         "local_block_pair", "the local kind, blocks of 8, beside their blocks with no look-around; "
                             "the same q, k, v, a padding mask"),
    Pair("efficient-attention", "linear-attention-transformer==0.19.1",
         "linear_attention_transformer.SelfAttention", "lat_pair",
         "their global (linear) heads, non-causal, a padding mask; their factor d^-1/2 on the "
         "queries (see the difference) folded into the copy of their output projection"),
    Pair("axial-attention", "axial-attention==0.6.1", "axial_attention.AxialAttention", "axial_pair",
         "a 5 x 7 grid; theirs run one axis after the other (sum_axial_out=False, not their "
         "default sum of the two) on the transposed grid, so that their first axis is our rows"),
    Pair("bigbird", TRANSFORMERS, "BigBirdBlockSparseAttention", "bigbird_pair",
         "ours with global_at=\"ends\" (first and last block global); theirs in training mode, "
         "its random blocks (numpy, seeded) handed to ours; n = 64, blocks of 4, 2 random blocks, "
         "a padding mask; ours' output projection the identity (theirs stops before it)"),
    Pair("product-key-memory", "product-key-memory==0.3.0", "product_key_memory.PKM", "pkm_pair",
         "2 heads, 16 sub-keys per half, top 4, query halves of 8; their query LayerNorm "
         "removed (see the difference)"),
)

DIFFERENCES: tuple[Difference, ...] = (
    Difference("softmax-attention", "x-transformers==2.31.10", "x_transformers_float32",
               "their attention softmax runs in float32 even for float64 input"),
    Difference("performer", "performer-pytorch==1.1.4", "performer_epsilon",
               "their feature map adds 1e-4 to every random feature, which dominates small "
               "features", ours=True),
    Difference("performer", "performer-pytorch==1.1.4", "performer_causal_epsilon",
               "causal: the same 1e-4, and 1e-6 added to the normaliser"),
    Difference("nystromformer", "nystrom-attention==0.0.14", "nystrom_batch_pinv",
               "their pseudo-inverse iteration starts from one scale, a maximum over the whole "
               "batch and all heads (ours: per matrix), so a sample's output depends on the "
               "others; measured at batch 2, 2 heads"),
    Difference("nystromformer", TRANSFORMERS, "hf_nystrom_batch_pinv",
               "as nystrom-attention: the pseudo-inverse iteration starts from one scale over the "
               "whole batch and all heads; measured at batch 2, 2 heads"),
    Difference("kronecker-attention", "kronecker-attention-pytorch==0.0.6", "kronecker_double_bias",
               "their output convolution, bias included, is applied to the row and the column "
               "summaries before they are added, so the bias counts twice"),
    Difference("product-key-memory", "product-key-memory==0.3.0", "pkm_query_norm",
               "their queries pass through a LayerNorm (each half of each head) before the key "
               "search, where the paper has a BatchNorm and ours neither (see our notes), so "
               "other values are read"),
    Difference("bigbird", TRANSFORMERS, "bigbird_eval_zero_blocks",
               "in eval mode their random block indices are all 0, so block 0 enters each middle "
               "row's softmax r + 1 times (ours reads each key once, with its random blocks in "
               "both modes); measured against ours without random blocks, theirs in training "
               "mode removes the cause"),
    Difference("longformer", TRANSFORMERS, "longformer_float32",
               "their softmax (local and global rows) runs in float32 even for float64 input"),
    Difference("informer", TRANSFORMERS, "informer_log1p",
               "their number of active queries is c ceil(ln(1 + n)) where the paper's is "
               "c ceil(ln n); at n = 20 every query is active in theirs, 15 of 20 in ours"),
    Difference("reformer", TRANSFORMERS, "reformer_temperature",
               "their scores are q . k / |k| with no further 1/sqrt(d), a temperature sqrt(d) away "
               "from ours, which follows the paper's formulas; ours with scale=1.0 is theirs",
               ours=True),
    Difference("reformer", TRANSFORMERS, "reformer_norm_epsilon",
               "their key normalisation adds 1e-6 to each key's mean square"),
    Difference("reformer", TRANSFORMERS, "reformer_other_buckets",
               "their sorted chunks read every key in the chunk and the one before, of any bucket; "
               "ours only keys of the query's own bucket. Equal once their mask refuses the other "
               "buckets' keys: their LSH path (one round, 4 buckets, chunks of 8, n = 48, one head "
               "of 32) with their rotation copied into ours, ours with scale=1.0, their key-norm "
               "epsilon at 0"),
    Difference("efficient-attention", "linear-attention-transformer==0.19.1", "lat_query_scale",
               "their queries are multiplied by d^-1/2 after the feature softmax, a factor our "
               "formula (the paper's) does not have: the output shrinks by sqrt(d)"),
    Difference("memory-compressed-attention", "memory-compressed-attention==0.0.7", "mca_null_slot",
               "theirs always adds an empty key/value slot (zero key and value: weight e^0 in "
               "every softmax, nothing added to the output); equal once ours is given that slot. "
               "Measured with one head, n a multiple of c, their one convolution for keys and "
               "values copied into both of ours"),
    Difference("set-transformer", "isab-pytorch==0.3.0", "isab_attention_only",
               "their ISAB's blocks are the attention alone, with no residual, LayerNorm or "
               "feed-forward (the paper's MAB, eq. 6-7, has them, and so has ours); equal once "
               "ours' MAB is cut down to its attention (their head width 64, their inducing "
               "points copied, a padding mask)"),
    Difference("fastformer", "fast-transformer-pytorch==0.0.4", "fastformer_raw_keys",
               "their global key sums the raw keys, weighted by the scores of the query-weighted "
               "ones; the paper (and ours) sums the query-weighted keys. Equal to ours once ours "
               "sums the raw keys (their query pooling shared by heads and their per-head W_r "
               "copied into ours; a padding mask)"),
)


def cell(text: str) -> str:
    """`text` safe inside a markdown table cell (a `|` would end the cell)."""
    return text.replace("|", "\\|")


def _size(x: float) -> str:
    return f"{x:.1e}"


def _pair_row(p: Pair, measured: dict | None) -> str:
    got = (measured or {}).get("pairs", {}).get(p.function)
    result = (f"tested equal: {_size(got)} (tolerance {p.tolerance:g})" if got is not None
              else f"tested equal (tolerance {p.tolerance:g})")
    return f"| `{p.peer}` | `{p.module}` | {result} | {cell(p.configuration)} |"


def _difference_row(d: Difference, measured: dict | None) -> str:
    got = (measured or {}).get("differences", {}).get(d.function)
    size = (f"{_size(got['shipped'])} as shipped; {_size(got['removed'])} with the cause removed"
            if got else "not measured")
    ours = " Our convention, named in our docstring and notes." if d.ours else ""
    return f"| `{d.peer}` | {cell(d.cause)}{ours} | {size} |"


def _tables(pairs: list[Pair], diffs: list[Difference], measured: dict | None,
            entry_column: bool) -> list[str]:
    out: list[str] = []
    if pairs:
        head = "| entry " if entry_column else ""
        out += [head + "| implementation | compared | result (largest difference, relative) "
                "| configuration |", ("| --- " if entry_column else "") + "| --- | --- | --- | --- |"]
        out += [(f"| [`{p.entry}`](entries/{p.entry}.md) " if entry_column else "") + _pair_row(p, measured)
                for p in pairs]
        out.append("")
    if diffs:
        head = "| entry " if entry_column else ""
        out += ["Differences as shipped, each with its cause:", "",
                head + "| implementation | cause | size (largest difference, relative) |",
                ("| --- " if entry_column else "") + "| --- | --- | --- |"]
        out += [(f"| [`{d.entry}`](entries/{d.entry}.md) " if entry_column else "")
                + _difference_row(d, measured) for d in diffs]
        out.append("")
    return out


HOW = ("Weights copied from the public module into ours, random parts shared (feature matrices, "
       "projections), float64, the same input; the size is the largest absolute difference of "
       "the outputs over the largest absolute output. Each equality is also run with one of our "
       "weights (where theirs has none, one entry of a query) moved by 1e-3, and must then fail "
       "(`tests/peers/`, the extra `peers`).")


def entry_peers(e: Entry, measured: dict | None) -> str:
    """The entry page's "Compared with other implementations" section ('' without pairs)."""
    pairs = [p for p in PAIRS if p.entry == e.id]
    diffs = [d for d in DIFFERENCES if d.entry == e.id]
    if not pairs and not diffs:
        return ""
    out = ["## Compared with other implementations", "", HOW,
           "Every pair, all entries: [Compared with other implementations](../peers.md).", ""]
    return "\n".join(out + _tables(pairs, diffs, measured, entry_column=False))


def peers_page(measured: dict | None) -> str:
    """The gathered page: every pair and every difference."""
    # ranked below the entry pages in search: it names every mechanism, but a search for one
    # ("Nystrom") should land on its entry first
    out = ["---", "search:", "  boost: 0.5", "---", "", "# Compared with other implementations", "",
           "Does the zoo give the same numbers as the implementation you use? " + HOW, ""]
    if measured:
        out += [f"Measured with torch {measured['torch']} on {measured['date'][:10]} "
                "(`make peers` writes `benchmarks/peers.json`; the tests check it).", ""]
    else:
        out += ["No measurements are committed yet (`benchmarks/peers.json`).", ""]
    return "\n".join(out + _tables(list(PAIRS), list(DIFFERENCES), measured, entry_column=True))

r"""Permutohedral Attention Module for Efficient Non-Local Neural Networks.

A non-local block whose affinity is a Gaussian of the distance between low-dimensional features,
$e^{-\lVert f_i - f_j \rVert^2 / 2}$. Such a Gaussian filter of every pixel against every pixel
can be approximated in linear time with the permutohedral lattice (Adams et al., 2010): each
point's feature is lifted onto a hyperplane tiled by simplices; its value is *splatted* onto the
d + 1 corners of its simplex with barycentric weights; the lattice is *blurred* with a [1 2 1]
kernel along each of its d + 1 axes; and every output is *sliced* back from its simplex corners.
Only lattice points that some pixel touches are stored (a hash table), so time and memory are
linear in the pixels for a fixed feature dimension (cost grows as $d^2$ in it).

$$ y_i \approx \frac{\sum_j e^{-\lVert f_i - f_j\rVert^2 / 2}\, g(x_j)}
                    {\sum_j e^{-\lVert f_i - f_j\rVert^2 / 2}},
   \qquad f = \mathrm{lrelu}\big(W_f\,[x;\ s \odot p]\big),\quad
   z = x + W_z\, y $$

with $p$ the pixel's centred coordinates and $s$ a learned per-axis scale, as in the paper.
`attend(q, k, v)` splats at the keys and slices at the queries (both are the features $f$ in the
layer), so the effective map $A$ with $y = A v$ can be read off like any kernel entry.

Deviations from the paper:
- the filter is normalised (divided by the filtered constant 1, the non-local block's $C(x)$);
  the authors' code leaves it unnormalised, which makes the output scale with the local density
  of features;
- the hash table is `torch.unique` over the integer lattice keys packed into one int64 (whole rows
  when they do not fit), neighbours are found by `searchsorted`, and splat, blur and slice are
  weighted sums over index lists (`embedding_bag`), where the paper uses a custom hash table;
  gradients come from autograd through the barycentric weights instead of the paper's
  hand-written backward pass;
- the block adds $W_z y$ to the input, as a non-local block (the authors' module returns y).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.core.checks import check_image, check_qkv, positive_int, refuse_mask
from zoo.core.masks import safe_denominator


def elevation_matrix(d: int, dtype=torch.float64) -> torch.Tensor:
    """`(d + 1, d)`: lifts features onto the hyperplane of coordinates summing to zero, scaled so
    that the lattice blur approximates a unit Gaussian (Adams et al., sec. 3.1)."""
    scale = [(d + 1) * math.sqrt(2 / 3) / math.sqrt((i + 1) * (i + 2)) for i in range(d)]
    e = torch.zeros(d + 1, d, dtype=dtype)
    for j in range(d + 1):
        for i in range(j, d):
            e[j, i] = scale[i]
        if j > 0:
            e[j, j - 1] = -j * scale[j - 1]
    return e


def simplex(f: torch.Tensor):
    """The lattice simplex enclosing each point and its barycentric weights.

    Args:
        f: features `(p, d)`.

    Returns:
        `(corners (p, d + 1, d) long, weights (p, d + 1))`: the first d coordinates of each
        enclosing lattice point (the last is minus their sum) and its barycentric weight.
    """
    d = f.shape[-1]
    elevated = f @ elevation_matrix(d, f.dtype).to(f.device).T  # (p, d+1)
    rem0 = torch.round(elevated / (d + 1)) * (d + 1)  # nearest remainder-0 point
    diff = elevated - rem0
    order = torch.argsort(diff, dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1)
    rank = rank + (rem0.sum(-1, keepdim=True) / (d + 1)).round().long()
    # walk back onto the hyperplane: ranks must lie in 0..d
    low, high = rank < 0, rank > d
    rank = rank + (d + 1) * (low.long() - high.long())
    rem0 = rem0 + (d + 1) * (low.to(f.dtype) - high.to(f.dtype))
    y = (elevated - rem0) / (d + 1)
    bary = f.new_zeros(f.shape[0], d + 2)
    bary = bary.scatter_add(1, d - rank, y).scatter_add(1, d + 1 - rank, -y)
    bary = torch.cat([bary[:, :1] + 1 + bary[:, -1:], bary[:, 1:d + 1]], dim=1)  # (p, d+1)
    r = torch.arange(d + 1, device=f.device)
    # corner r of the simplex: rem0 + r, minus d + 1 where rank > d - r (canonical simplex)
    corners = (rem0.long()[:, None, :] + r[None, :, None]
               - (d + 1) * (rank[:, None, :] > (d - r)[None, :, None]).long())
    return corners[..., :d], bary


def hash_lattice(keys: torch.Tensor, d: int):
    """The hash table of the lattice points in `keys` and the neighbours of each along every axis.

    Args:
        keys: `(p, 1 + d)` long: a group id, then the first d coordinates of a lattice point.

    Returns:
        `(index (p,), neighbours (2, d + 1, m), m)`: each key's row in the table of the m distinct
        points, and for every point its successor and predecessor along each lattice axis j
        (+1 on every coordinate, -d on the j-th), or m where that point is not stored.
    """
    steps = torch.ones(d + 1, d + 1, dtype=torch.long, device=keys.device)
    steps[:, 0] = 0  # the group id
    steps[:d, 1:] -= (d + 1) * torch.eye(d, dtype=torch.long, device=keys.device)
    # Keys as one integer, digit by digit; the margin of d + 1 on each coordinate keeps every
    # neighbour's digits in range, so a step is the same addition to every code.
    lo = keys.amin(dim=0) - (d + 1)
    radix = (keys.amax(dim=0) - lo + d + 2).tolist()
    if math.prod(radix) < 2 ** 62:
        place = torch.tensor([math.prod(radix[i + 1:]) for i in range(d + 1)], device=keys.device)
        table, index = torch.unique(((keys - lo) * place).sum(-1), return_inverse=True)  # sorted
        wanted = torch.stack([table + steps @ place[:, None], table - steps @ place[:, None]])
        pos = torch.searchsorted(table, wanted).clamp(max=table.shape[0] - 1)
        found = table[pos] == wanted
    else:  # coordinates too spread for one int64: hash whole rows (slower)
        table, index = torch.unique(keys, dim=0, return_inverse=True)
        wanted = torch.stack([table + steps[:, None], table - steps[:, None]])  # (2, d+1, m, w)
        both, inverse = torch.unique(torch.cat([table, wanted.flatten(0, 2)]), dim=0,
                                     return_inverse=True)
        row = torch.full((both.shape[0],), -1, dtype=torch.long, device=keys.device)
        row[inverse[:table.shape[0]]] = torch.arange(table.shape[0], device=keys.device)
        pos = row[inverse[table.shape[0]:]].view(wanted.shape[:3])
        found = pos >= 0
    m = table.shape[0]
    return index, torch.where(found, pos, m), m


def lattice_filter(f_out: torch.Tensor, f_in: torch.Tensor, v: torch.Tensor,
                   g_out: torch.Tensor, g_in: torch.Tensor) -> torch.Tensor:
    """Unnormalised Gaussian filtering on the permutohedral lattice.

    Args:
        f_out: `(p, d)` features where outputs are sliced; f_in `(s, d)` where values are splatted.
        v: `(s, e)` values. g_out `(p,)`, g_in `(s,)`: group ids; groups never share a lattice.

    Returns:
        `(p, e)`, approximately `sum_j exp(-|f_out_i - f_in_j|^2 / 2) v_j` within each group (up
        to a constant factor).
    """
    d, p = f_in.shape[-1], f_out.shape[0]
    same = f_out is f_in and g_out is g_in  # self-filtering: one set of simplices
    corners, w_in = simplex(f_in)
    groups = g_in
    if not same:
        corners_out, w_out = simplex(f_out)
        corners, groups = torch.cat([corners, corners_out]), torch.cat([g_in, g_out])
    keys = torch.cat([groups[:, None, None].expand(-1, d + 1, 1), corners], dim=-1)
    index, neighbours, m = hash_lattice(keys.flatten(0, 1), d)
    idx_in = index[:f_in.shape[0] * (d + 1)]
    idx_out, w_out = (idx_in, w_in) if same else (index[idx_in.shape[0]:], w_out)
    # splat: each lattice point sums its (point, weight) pairs, sorted into one bag per point;
    # the extra last point stays empty (zero) and stands for every missing neighbour
    order = torch.argsort(idx_in)
    counts = torch.bincount(idx_in, minlength=m + 1)
    offsets = counts.cumsum(0) - counts
    lattice = F.embedding_bag(order // (d + 1), v, offsets, mode="sum",
                              per_sample_weights=w_in.flatten()[order])  # (m+1, e)
    # blur: [1 2 1] / 4 along each lattice axis
    last = torch.full((1, 3), m, dtype=torch.long, device=v.device)
    taps = v.new_tensor([0.5, 0.25, 0.25]).expand(m + 1, 3)
    for j in range(d + 1):
        bags = torch.stack([torch.arange(m, device=v.device), *neighbours[:, j]], dim=1)  # (m, 3)
        lattice = F.embedding_bag(torch.cat([bags, last]), lattice, mode="sum",
                                  per_sample_weights=taps, padding_idx=m)
    # slice
    return F.embedding_bag(idx_out.view(p, d + 1), lattice, mode="sum", per_sample_weights=w_out)


def permutohedral_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Normalised Gaussian attention through the lattice.

    Args:
        q, k: `(b, h, n, d)` features (slice at q, splat at k). v: `(b, h, j, e)`.

    Returns:
        `(b, h, n, e)`, approximately `softmax_j(-|q_i - k_j|^2 / 2) v`: a row of zero where no
        key reaches the query's simplex.
    """
    check_qkv(q, k, v, name="permutohedral_attention")
    b, h, n, _ = q.shape
    if b * h == 0:  # an empty batch has no lattice to build
        return v.new_zeros(v.shape)
    dtype = torch.promote_types(q.dtype, torch.float32)  # lattice keys need >= 24 mantissa bits
    groups = torch.arange(b * h, device=q.device)
    fk, gk = k.flatten(0, 2).to(dtype), groups.repeat_interleave(k.shape[2])
    fq, gq = (fk, gk) if q is k else (q.flatten(0, 2).to(dtype), groups.repeat_interleave(n))
    values = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1).flatten(0, 2).to(dtype)
    out = lattice_filter(fq, fk, values, gq, gk)
    num, den = out[:, :-1], out[:, -1:]
    out = num / safe_denominator(den)
    return rearrange(out, "(b h n) e -> b h n e", b=b, h=h).to(v.dtype)


class PermutohedralAttention(nn.Module):
    """Non-local block with permutohedral Gaussian attention. `(b, dim, y, x) -> same`.

    Args:
        dim: channels.
        heads: independent lattices (the authors' `n_split`); must divide `dim`.
        dim_head: feature dimension d of each lattice (cost grows as d^2).
    """

    def __init__(self, dim: int, *, heads: int = 2, dim_head: int = 4):
        super().__init__()
        self.dim, self.heads = positive_int(dim, "dim"), positive_int(heads, "heads")
        self.dim_head = positive_int(dim_head, "dim_head")
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.pos_scale = nn.Parameter(torch.ones(2))  # s
        self.to_feat = nn.Conv2d(dim + 2, heads * dim_head, 1)  # W_f
        self.to_v = nn.Conv2d(dim, dim, 1)  # g
        self.to_out = nn.Conv2d(dim, dim, 1)  # W_z

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        refuse_mask(type(self).__name__, mask)
        return permutohedral_attention(q, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        b, _, hh, ww = x.shape
        grid = torch.meshgrid(torch.arange(hh, device=x.device) - hh // 2,
                              torch.arange(ww, device=x.device) - ww // 2, indexing="ij")
        pos = torch.stack(grid).to(x.dtype) * self.pos_scale.to(x.dtype)[:, None, None]
        feat = F.leaky_relu(self.to_feat(torch.cat([x, pos.expand(b, 2, hh, ww)], dim=1)))
        f = rearrange(feat, "b (h d) y x -> b h (y x) d", h=self.heads)
        v = rearrange(self.to_v(x), "b (h e) y x -> b h (y x) e", h=self.heads)
        out = rearrange(self.attend(f, f, v), "b h (y x) e -> b (h e) y x", y=hh)
        return x + self.to_out(out)

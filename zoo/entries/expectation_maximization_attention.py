r"""Expectation-Maximization Attention Networks for Semantic Segmentation.

Instead of attending from every pixel to every pixel, run a few steps of expectation
maximisation on the pixels of one image against a small set of K bases. The E-step is attention
from the pixels to the bases (a softmax over the bases of scaled dot products); the M-step moves
each basis to the responsibility-weighted mean of the pixels and L2-normalises it. The output
rebuilds every pixel from the bases it is responsible to, a rank-K reconstruction, so the cost is
linear in the pixels. The initial bases are shared across images and kept, in training, as a
moving average of the final bases.

$$ Z^{(t)} = \operatorname{softmax}_k\big(\lambda\, X \mu^{(t-1)\top}\big), \qquad
   \mu^{(t)}_k = \frac{\sum_n z^{(t)}_{nk} x_n}{\big\lVert \sum_n z^{(t)}_{nk} x_n \big\rVert}, \qquad
   \tilde X = Z^{(T)} \mu^{(T)} $$

With unit bases these are exactly the EM steps for a mixture of von Mises-Fisher components
(equal weights, concentration $\lambda$): each iteration raises
$\sum_n \log \sum_k e^{\lambda x_n^\top \mu_k}$ (tested).

Deviations from the paper:
- gradients flow through all T iterations (the authors' code runs them under `no_grad`, so its
  first 1x1 convolution gets no gradient);
- the authors' code adds a ReLU after the reconstruction and after the residual sum, and a
  BatchNorm after the last convolution; all left out (the BatchNorm would couple the batch).
- $\mu^{(0)}$ is a buffer drawn from `seed` (Kaiming normal, then L2-normalised, as the paper's
  initialisation); it changes only in training mode, by the paper's moving average
  $\mu^{(0)} \leftarrow \alpha \mu^{(0)} + (1 - \alpha)\,\overline{\mu^{(T)}}$ (batch mean, then
  L2Norm). Eval mode is deterministic and each image is processed on its own. Under data
  parallelism (a `torch.distributed` process group) the batch mean is taken over the global
  batch (sums and counts reduced over the ranks), so all ranks keep the same bases.
"""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce, repeat
from torch import nn

from zoo.core.checks import check_image, nonnegative_float, positive_int, unit_interval


def em_attention(x: torch.Tensor, mu: torch.Tensor, *, iterations: int = 3, lam: float = 1.0):
    """T steps of EM attention.

    Args:
        x: pixels `(b, n, c)`.
        mu: initial bases `(b, r, c)`, unit rows.
        iterations: T >= 1.
        lam: the E-step's scale, the paper's lambda.

    Returns:
        `(reconstruction (b, n, c), responsibilities z (b, n, r), bases mu (b, r, c))`.
    """
    for _ in range(positive_int(iterations, "iterations")):
        z = (lam * einsum(x, mu, "b n c, b r c -> b n r")).softmax(dim=-1)  # E-step
        mu = einsum(z, x, "b n r, b n c -> b r c") / rearrange(z.sum(dim=1) + 1e-6, "b r -> b r 1")
        mu = F.normalize(mu, dim=-1)  # M-step, then L2Norm
    return einsum(z, mu, "b n r, b r c -> b n c"), z, mu  # A_R: X~ = Z mu


class ExpectationMaximizationAttention(nn.Module):
    """The EM attention unit. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: channels.
        bases: number of bases K.
        iterations: EM steps T.
        lam: E-step scale lambda.
        momentum: alpha of the moving average of the initial bases (training mode only).
        seed: seeds the initial bases.
    """

    def __init__(self, dim: int, *, bases: int = 64, iterations: int = 3, lam: float = 1.0,
                 momentum: float = 0.9, seed: int = 0):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        self.iterations = positive_int(iterations, "iterations")
        self.lam, self.momentum = nonnegative_float(lam, "lam"), unit_interval(momentum, "momentum")
        g = torch.Generator().manual_seed(seed)
        mu = torch.randn(positive_int(bases, "bases"), dim, generator=g) * math.sqrt(2 / bases)
        self.register_buffer("mu", F.normalize(mu, dim=-1))  # (r c)
        self.conv_in = nn.Conv2d(dim, dim, 1)
        self.conv_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        pixels = rearrange(self.conv_in(x), "b c y x -> b (y x) c")
        # in training the buffer is updated in place below: backward needs the bases as they were
        mu = self.mu.clone() if self.training else self.mu
        mu0 = repeat(mu.to(x.dtype), "r c -> b r c", b=x.shape[0])
        recon, _, mu = em_attention(pixels, mu0, iterations=self.iterations, lam=self.lam)
        if self.training:
            with torch.no_grad():
                total = reduce(mu, "b r c -> r c", "sum").to(self.mu.dtype)
                count = total.new_full((), mu.shape[0])
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(total)  # the global batch, on every rank
                    torch.distributed.all_reduce(count)
                mean = total / count
                self.mu.copy_(F.normalize(self.momentum * self.mu + (1 - self.momentum) * mean,
                                          dim=-1))
        return x + self.conv_out(rearrange(recon, "b (y x) c -> b c y x", y=x.shape[2]))

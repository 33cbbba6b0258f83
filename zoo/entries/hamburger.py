r"""Is Attention Better Than Matrix Decomposition?

Global context by low-rank reconstruction instead of attention. A 1x1 convolution and a ReLU (the
"lower bread") map the image to a non-negative matrix $X$ of `dim` channels by n pixels; the "ham"
factorises it as $X \approx D C$ with $r$ bases by non-negative matrix factorisation, running a
few of Lee and Seung's multiplicative updates; the low-rank reconstruction $D C$ goes through a
second 1x1 convolution (the "upper bread") and is added to the input. Each update costs
$\mathcal{O}(n\, \text{dim}\, r)$, so the block is linear in the number of pixels. Gradients flow
only through the last update of $C$ (the paper's one-step gradient).

$$ C \leftarrow C \odot \frac{X^\top D + \epsilon}{C D^\top D + \epsilon}, \qquad
   D \leftarrow D \odot \frac{X C + \epsilon}{D C^\top C + \epsilon}, \qquad
   Y = Z + W_u\, D C, \quad X = \operatorname{ReLU}(W_l Z) $$

(here $C$ is stored as `(n, r)`, so the reconstruction is $D C^\top$ in the code's layout).

Deviations from the paper:
- $\epsilon$ is added to the numerator as well as the denominator of each update (the authors'
  code adds it to the denominator only): then each update provably never increases
  $\lVert X - D C^\top \rVert_F$ (Lee and Seung's auxiliary function with a larger diagonal), with the
  same fixed points;
- the initial bases are a buffer drawn once from `seed` (uniform, unit columns), so eval mode is
  deterministic; in training mode they are redrawn every call, as in the paper;
- one number of steps for training and evaluation (the authors use 6 and 7); no BatchNorm after
  the upper bread and no ReLU after the residual sum; one group (S = 1).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_image, positive_int


def update_coef(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor, eps: float = 1e-6):
    """C <- C * (X^T D + eps) / (C D^T D + eps). x `(b, d, n)`, bases `(b, d, r)`, coef `(b, n, r)`."""
    num = einsum(x, bases, "b d n, b d r -> b n r")
    den = einsum(coef, einsum(bases, bases, "b d r, b d s -> b r s"), "b n r, b r s -> b n s")
    return coef * (num + eps) / (den + eps)


def update_bases(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor, eps: float = 1e-6):
    """D <- D * (X C + eps) / (D C^T C + eps). Shapes as in `update_coef`."""
    num = einsum(x, coef, "b d n, b n r -> b d r")
    den = einsum(bases, einsum(coef, coef, "b n r, b n s -> b r s"), "b d r, b r s -> b d s")
    return bases * (num + eps) / (den + eps)


def nmf_ham(x: torch.Tensor, bases: torch.Tensor, *, steps: int = 6, eps: float = 1e-6) -> torch.Tensor:
    """The NMF ham: `steps` multiplicative updates without gradient, then one update of the
    coefficients with gradient (one-step gradient).

    Args:
        x: `(b, d, n)`, non-negative. bases: initial `(b, d, r)`, positive.

    Returns:
        The reconstruction `(b, d, n)`.
    """
    with torch.no_grad():
        coef = einsum(x, bases, "b d n, b d r -> b n r").softmax(dim=-1)
        for _ in range(steps):
            coef = update_coef(x, bases, coef, eps)
            bases = update_bases(x, bases, coef, eps)
    coef = update_coef(x, bases, coef, eps)
    return einsum(bases, coef, "b d r, b n r -> b d n")


class Hamburger(nn.Module):
    """Hamburger with the NMF ham. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: channels.
        rank: number of bases, `r`.
        steps: multiplicative updates before the last one.
        seed: seeds the initial bases.
    """

    def __init__(self, dim: int, *, rank: int = 64, steps: int = 6, seed: int = 0):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        self.rank = positive_int(rank, "rank")
        self.steps = positive_int(steps, "steps")
        self.lower_bread = nn.Conv2d(dim, dim, 1)
        self.upper_bread = nn.Conv2d(dim, dim, 1, bias=False)
        bases = torch.rand(dim, rank, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("bases", F.normalize(bases, dim=0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_image(z, self.dim, name=type(self).__name__, layer=self)
        x = rearrange(F.relu(self.lower_bread(z)), "b d y x -> b d (y x)")
        bases = F.normalize(torch.rand_like(self.bases), dim=0) if self.training else self.bases
        out = nmf_ham(x, bases.to(x.dtype).expand(x.shape[0], -1, -1), steps=self.steps)
        return z + self.upper_bread(rearrange(out, "b d (y x) -> b d y x", y=z.shape[2]))

"""Convolution experts: a depthwise convolution over the patch grid, among one image's tokens routed to the expert.

The research notes ask for conv experts. Expert ``e`` is a MobileNetV2 inverted
residual block without its skip (Sandler et al. 2018, "MobileNetV2: Inverted
Residuals and Linear Bottlenecks"): a pointwise expansion ``dim -> hidden``, the
activation, a depthwise ``kernel_size x kernel_size`` convolution over the
patch grid, the activation, a pointwise projection ``hidden -> dim``. The
convolution sees the expert's own rows of one image, each at its patch's cell
of the grid; cells of patches routed elsewhere are zero. So an expert mixes a
token with those of its neighbours that were routed to it, as the attention
expert attends among them — locality instead of all pairs.

Positions. Token ``n`` of an image sits at cell ``(n // side, n % side)`` of a
``side x side`` grid when the image has ``side²`` tokens: the row-major order
of the grid patch selector (the default), where this is the image's geometry.
Otherwise (a token count that is not a square, or Soft MoE slots, which have no
patch) the rows lie on a ``1 x n`` row in token or slot order: a 1-D
convolution over the sequence. Selected patches (``patches=entropy_topk`` ...)
are convolved in their selection order, which is not their place in the image.

Execution has no loop over tokens: the expanded rows are scattered into one
``[images, experts * hidden, height, width]`` canvas and a single grouped
``conv2d`` (``groups = experts * hidden``) runs every expert's depthwise kernel;
the rows are gathered back from their cells. The canvas holds every expert's
grid, so the convolution costs ``E x`` the per-row count of
:meth:`ConvExperts.flops_per_row` (small: ``k²`` against ``4 dim`` per hidden unit).
Rows that hold no token (``context.valid`` False) are left off the canvas.

>>> import torch
>>> from ssroute.experts.base import ExpertContext
>>> bank = ConvExperts(dim=8, hidden=16, num_experts=2)
>>> bank(torch.randn(5, 8), [2, 3], ExpertContext(torch.tensor([0, 4, 1, 2, 5]), 4, 2)).shape
torch.Size([5, 8])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.experts.base import EXPERTS, ExpertBank, ExpertContext
from ssroute.layers.mlp import build_activation


def grid_shape(tokens_per_image: int) -> tuple[int, int]:
    """``(height, width)`` the tokens of one image lie on: the square patch grid, else one row."""
    side = math.isqrt(tokens_per_image)
    return (side, side) if side * side == tokens_per_image else (1, tokens_per_image)


@EXPERTS.register("conv")
class ConvExperts(ExpertBank):
    """``E`` inverted-residual conv experts (pointwise, depthwise over the patch grid, pointwise).

    Args:
        dim: token width.
        hidden: expanded width, the channels of the depthwise convolution.
        num_experts: number of experts ``E``.
        kernel_size: odd side of the depthwise kernel (1 = no spatial mixing).
        activation: ``gelu``, ``relu`` or ``silu``.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, kernel_size: int = 3, activation: str = "gelu") -> None:
        super().__init__(dim, hidden, num_experts)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"experts conv: kernel_size={kernel_size} must be a positive odd number, for example 3.")
        self.kernel_size = kernel_size
        self.act = build_activation(activation)

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:  # nn.Linear / nn.Conv2d's default bound per expert
            bound = 1.0 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        self.w_in, self.b_in = uniform(num_experts, dim, hidden, fan_in=dim), uniform(num_experts, hidden, fan_in=dim)
        square = kernel_size * kernel_size
        self.w_dw, self.b_dw = (
            uniform(num_experts, hidden, kernel_size, kernel_size, fan_in=square),
            uniform(num_experts, hidden, fan_in=square),
        )
        self.w_out, self.b_out = uniform(num_experts, hidden, dim, fan_in=hidden), uniform(num_experts, dim, fan_in=hidden)

    def flops_per_row(self, tokens_per_image: int) -> float:
        return 2.0 * (2 * self.dim * self.hidden + self.kernel_size**2 * self.hidden)

    def _pointwise(self, x: Tensor, sizes: list[int], weight: Tensor, bias: Tensor) -> Tensor:
        """Each expert's block of rows through its own ``[fan_in, fan_out]`` weight."""
        weights, biases = weight.unbind(0), bias.unbind(0)
        blocks = [
            torch.addmm(biases[e], rows, weights[e]) if rows.shape[0] else rows.new_zeros(0, weight.shape[-1])
            for e, rows in enumerate(x.split(sizes))
        ]
        return torch.cat(blocks)

    def _cells(self, expert: Tensor, context: ExpertContext) -> tuple[Tensor, int, int]:
        """``[rows]`` cell of each row on its image's grid, and the grid's ``(height, width)``."""
        if context.token_index is not None:
            height, width = grid_shape(context.tokens_per_image)
            return context.token_index % context.tokens_per_image, height, width
        # slots: their rank within the (expert, image) block, on one row
        block = expert * context.num_images + context.image_index
        order = torch.argsort(block, stable=True)
        counts = torch.bincount(block, minlength=self.num_experts * context.num_images)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(block.shape[0], device=block.device) - start.index_select(0, block.index_select(0, order))
        return torch.empty_like(rank).index_copy(0, order, rank), 1, int(counts.max())  # one host sync

    def forward(self, x: Tensor, sizes: list[int], context: ExpertContext) -> Tensor:
        if x.shape[0] == 0:
            return x
        if context is None:
            raise ConfigError("experts conv needs an ExpertContext (each row's image and position); run it inside an MoE layer.")
        experts, hidden, images = self.num_experts, self.hidden, context.num_images
        expert = torch.repeat_interleave(torch.arange(experts, device=x.device), torch.tensor(sizes, device=x.device))
        image = context.image_index
        cell, height, width = self._cells(expert, context)
        h = self.act(self._pointwise(x, sizes, self.w_in, self.b_in))
        placed = h if context.valid is None else h * context.valid.unsqueeze(1).to(h.dtype)
        canvas = h.new_zeros(images, experts, height * width, hidden).index_put((image, expert, cell), placed, accumulate=True)
        canvas = canvas.view(images, experts, height, width, hidden).permute(0, 1, 4, 2, 3).reshape(images, experts * hidden, height, width)
        kernel = self.w_dw.reshape(experts * hidden, 1, self.kernel_size, self.kernel_size)
        mixed = F.conv2d(canvas, kernel, self.b_dw.reshape(-1), padding=self.kernel_size // 2, groups=experts * hidden)
        mixed = mixed.view(images, experts, hidden, height * width).transpose(2, 3)  # [images, experts, cells, hidden]
        return self._pointwise(self.act(mixed[image, expert, cell]), sizes, self.w_out, self.b_out)

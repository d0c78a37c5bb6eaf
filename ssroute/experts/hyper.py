"""Hypernetwork-generated experts: each expert is an embedding, one shared network makes its weights.

HyperNetworks (Ha et al. 2016) generate a layer's weights from a small
embedding. Here expert ``e`` owns only ``embeddings[e]`` (``[embed_dim]``); one
shared hypernetwork maps any embedding to the weights of a two-layer MLP expert
``w_in [dim, hidden]``, ``b_in [hidden]``, ``w_out [hidden, dim]``, ``b_out [dim]``:

- ``rank=None`` (full): a linear map ``embed_dim -> dim * hidden`` per matrix;
- ``rank=r`` (low-rank): the embedding makes factors ``[dim, r]`` and
  ``[r, hidden]`` (and ``[hidden, r]``, ``[r, dim]``), whose products are the
  matrices, so the hypernetwork has ``embed_dim * r * (dim + hidden)`` weights
  per matrix instead of ``embed_dim * dim * hidden``.

Weights are generated **once per forward for all experts** (batched matmuls over
``[experts, embed_dim]``), never per token; the rows then run through the same
per-expert block matmuls as ``mlp``, so per-token FLOPs equal an ``mlp`` expert
of the same ``dim`` and ``hidden`` while the parameters are the hypernetwork
(shared) plus ``embed_dim`` per expert. New experts come from new embeddings:
:meth:`HyperExperts.forward_with` runs the bank with any ``[experts', embed_dim]``
embeddings (an interpolation of two experts, or :meth:`summary_embedding` of
some tokens), and :meth:`use_embeddings` swaps them in for a whole layer forward.

>>> import torch
>>> bank = HyperExperts(dim=8, hidden=16, num_experts=3, embed_dim=4, rank=2)
>>> bank(torch.randn(5, 8), [2, 0, 3], None).shape
torch.Size([5, 8])
>>> mixed = torch.lerp(bank.embeddings[0], bank.embeddings[1], 0.5)[None]   # a new, fourth expert
>>> bank.forward_with(torch.randn(4, 8), [4], None, mixed).shape
torch.Size([4, 8])
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.experts.base import EXPERTS, ExpertBank, ExpertContext
from ssroute.layers.mlp import build_activation


class _MatrixGenerator(nn.Module):
    """Embeddings ``[n, e]`` -> matrices ``[n, rows, cols]`` (full or low-rank), scaled like nn.Linear's init."""

    def __init__(self, embed_dim: int, rows: int, cols: int, rank: int | None) -> None:
        super().__init__()
        self.rows, self.cols, self.rank = rows, cols, rank
        target = 1.0 / math.sqrt(rows)  # std of a generated entry, as a fan-in init of a rows -> cols layer
        if rank is None:
            self.full = nn.Parameter(torch.randn(embed_dim, rows * cols) * target / math.sqrt(embed_dim))
        else:
            # entry = sum over r of u * v: std(u) = 1, std(v) = target / sqrt(r) gives std(entry) = target
            self.left = nn.Parameter(torch.randn(embed_dim, rows * rank) / math.sqrt(embed_dim))
            self.right = nn.Parameter(torch.randn(embed_dim, rank * cols) * target / math.sqrt(embed_dim * rank))

    def forward(self, embeddings: Tensor) -> Tensor:
        n = embeddings.shape[0]
        if self.rank is None:
            return (embeddings @ self.full).view(n, self.rows, self.cols)
        left = (embeddings @ self.left).view(n, self.rows, self.rank)
        right = (embeddings @ self.right).view(n, self.rank, self.cols)
        return torch.bmm(left, right)


@EXPERTS.register("hyper")
class HyperExperts(ExpertBank):
    """``E`` two-layer MLP experts whose weights a shared hypernetwork generates from embeddings.

    Args:
        dim: token width.
        hidden: one expert's hidden width.
        num_experts: number of experts ``E``.
        embed_dim: width of an expert embedding.
        rank: rank of the generated matrices; None = full (a linear map to every entry).
        activation: ``gelu``, ``relu`` or ``silu``.
    """

    def __init__(
        self, dim: int, hidden: int, num_experts: int, embed_dim: int = 16, rank: int | None = 8, activation: str = "gelu"
    ) -> None:
        super().__init__(dim, hidden, num_experts)
        if embed_dim < 1:
            raise ConfigError(f"experts hyper: embed_dim={embed_dim} must be a positive integer.")
        if rank is not None and not 1 <= rank <= min(dim, hidden):
            raise ConfigError(
                f"experts hyper: rank={rank} must be between 1 and min(dim, hidden)={min(dim, hidden)}, or null for full matrices."
            )
        self.embed_dim, self.rank = embed_dim, rank
        self.act = build_activation(activation)
        self.embeddings = nn.Parameter(torch.randn(num_experts, embed_dim))
        self.gen_in = _MatrixGenerator(embed_dim, dim, hidden, rank)
        self.gen_out = _MatrixGenerator(embed_dim, hidden, dim, rank)
        self.gen_b_in = nn.Linear(embed_dim, hidden)  # its bias is a bias shared by every expert
        self.gen_b_out = nn.Linear(embed_dim, dim)
        for layer in (self.gen_b_in, self.gen_b_out):
            nn.init.normal_(layer.weight, std=0.02 / math.sqrt(embed_dim))
            nn.init.zeros_(layer.bias)

    def shared_params(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if name != "embeddings")

    def flops_per_row(self, tokens_per_image: int) -> float:
        return 2.0 * 2 * self.dim * self.hidden  # as an mlp expert: generation is per step, not per row

    def generate(self, embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``[n, embed_dim]`` -> ``w_in [n, dim, hidden]``, ``b_in [n, hidden]``, ``w_out [n, hidden, dim]``, ``b_out [n, dim]``."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ConfigError(f"experts hyper: embeddings must be [experts, {self.embed_dim}], got {list(embeddings.shape)}.")
        return self.gen_in(embeddings), self.gen_b_in(embeddings), self.gen_out(embeddings), self.gen_b_out(embeddings)

    def affinity(self, tokens: Tensor) -> Tensor:
        """``[experts]`` how strongly each expert's hidden units fire on tokens ``[n, dim]``: the mean
        activation magnitude ``mean |act(x w_in + b_in)|`` over tokens and hidden units.

        Magnitudes, not signed pre-activations: summing pre-activations over hidden
        units lets positive and negative responses cancel.
        """
        w_in, b_in, _, _ = self.generate(self.embeddings)
        hidden = self.act(torch.einsum("nd,edh->enh", tokens, w_in) + b_in[:, None, :])  # [experts, n, hidden]
        return hidden.abs().mean(dim=(1, 2))

    def summary_embedding(self, tokens: Tensor, temperature: float = 0.1) -> Tensor:
        """A new expert embedding ``[1, embed_dim]`` for tokens ``[n, dim]``: the expert embeddings mixed by
        ``softmax(log affinity / temperature)`` (:meth:`affinity`), so the experts that fire most on them dominate."""
        weights = torch.softmax(self.affinity(tokens).clamp_min(1e-12).log() / temperature, dim=0)
        return (weights @ self.embeddings)[None]

    def forward_with(self, x: Tensor, sizes: list[int], context: ExpertContext | None, embeddings: Tensor) -> Tensor:
        """Run ``len(sizes)`` experts generated from ``embeddings [len(sizes), embed_dim]`` on expert-sorted rows."""
        if len(sizes) != embeddings.shape[0]:
            raise ConfigError(f"experts hyper: {len(sizes)} row blocks but {embeddings.shape[0]} embeddings; give one embedding per block.")
        w_in, b_in, w_out, b_out = (t.unbind(0) for t in self.generate(embeddings))
        outputs = []
        for e, rows in enumerate(x.split(sizes)):
            if rows.shape[0] == 0:
                outputs.append(rows)
                continue
            outputs.append(torch.addmm(b_out[e], self.act(torch.addmm(b_in[e], rows, w_in[e])), w_out[e]))
        return torch.cat(outputs)

    def forward(self, x: Tensor, sizes: list[int], context: ExpertContext | None) -> Tensor:
        embeddings = self._override if getattr(self, "_override", None) is not None else self.embeddings
        return self.forward_with(x, sizes, context, embeddings)

    @contextmanager
    def use_embeddings(self, embeddings: Tensor) -> Iterator[None]:
        """Within the block, the bank's ``E`` experts are generated from ``embeddings [E, embed_dim]``."""
        if embeddings.shape != self.embeddings.shape:
            raise ConfigError(f"experts hyper: use_embeddings needs {list(self.embeddings.shape)}, got {list(embeddings.shape)}.")
        self.__dict__["_override"] = embeddings  # a plain attribute, never registered as a parameter
        try:
            yield
        finally:
            self.__dict__["_override"] = None

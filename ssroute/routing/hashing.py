"""Parameter-free baselines: hash routing and random routing.

- ``hash``: Hash Layers (Roller et al. 2021, "Hash Layers For Large Sparse
  Models") route a token by a fixed hash of its id. Vision tokens have no
  vocabulary id, so the key is either the patch ``position`` within its image
  (a seeded permutation of positions taken modulo ``E``: every image splits
  its patches evenly and identically) or the token ``content`` (a
  random-hyperplane locality-sensitive hash of the token, then an integer hash).
- ``random``: each token takes ``k`` distinct experts drawn from a generator
  re-seeded on every call, so the same input size always routes the same way.

``probs [tokens, experts]`` is the one-hot of the hashed expert (``hash``) or
uniform (``random``); neither is learned (``learned = False``), so a routing
consistency loss skips them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssroute.errors import ConfigError
from ssroute.routing.base import Router, Routing, check_k, register_router, sparse_routing
from ssroute.routing.random_share import random_experts

_GOLDEN = 2654435761  # Knuth's multiplicative hash constant


@register_router("hash")
class HashRouter(Router):
    """Fixed hash of patch position or token content.

    >>> import torch
    >>> router = HashRouter(dim=8, num_experts=4)
    >>> router(torch.randn(16, 8), tokens_per_group=8).group_loads().tolist()
    [[2, 2, 2, 2], [2, 2, 2, 2]]

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        key: ``"position"`` (patch index within the image) or ``"content"``.
        seed: seeds the position permutation and the hyperplanes.
        hash_bits: hyperplanes of the content hash.
    """

    learned = False

    def __init__(self, dim: int, num_experts: int, key: str = "position", seed: int = 0, hash_bits: int = 16) -> None:
        super().__init__(dim, num_experts)
        if key not in ("position", "content"):
            raise ConfigError(f"router hash: key={key!r} is not valid; choose one of: position, content.")
        self.key, self.seed = key, seed
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(dim, hash_bits, generator=generator), persistent=False)
        self.register_buffer("powers", 2 ** torch.arange(hash_bits), persistent=False)
        self._position_table: dict[tuple[int, torch.device], Tensor] = {}

    def flops_per_token(self, tokens_per_group: int) -> float:
        return 2.0 * self.dim * self.planes.shape[1] if self.key == "content" else 0.0

    def position_table(self, group_tokens: int, device: torch.device) -> Tensor:
        """``[group_tokens]`` expert of each patch position (balanced, seeded)."""
        cache_key = (group_tokens, device)
        if cache_key not in self._position_table:
            generator = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(group_tokens, generator=generator)
            self._position_table[cache_key] = (perm % self.num_experts).to(device)
        return self._position_table[cache_key]

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        if self.key == "position":
            expert = self.position_table(n, tokens.device).repeat(tokens.shape[0] // n)
        else:
            code = (((tokens.detach() @ self.planes.to(tokens.dtype)) > 0).long() * self.powers).sum(-1)
            expert = ((code * _GOLDEN + self.seed) % (2**32)) % self.num_experts
        token = torch.arange(tokens.shape[0], device=tokens.device)
        probs = torch.nn.functional.one_hot(expert, self.num_experts).to(tokens.dtype)
        return sparse_routing(probs, token, expert, probs.new_ones(token.shape), n)


@register_router("random")
class RandomRouter(Router):
    """``k`` random experts per token, fixed per seed.

    >>> import torch
    >>> router = RandomRouter(dim=8, num_experts=4, k=2)
    >>> a, b = router(torch.randn(6, 8)), router(torch.randn(6, 8))
    >>> torch.equal(a.expert, b.expert)
    True

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        k: experts per token (settable with :meth:`set_k`).
        seed: seed of the per-call generator.
    """

    learned = False

    def __init__(self, dim: int, num_experts: int, k: int = 1, seed: int = 0) -> None:
        super().__init__(dim, num_experts)
        self.k = check_k(self.name, k, num_experts)
        self.seed = seed

    def set_k(self, k: int) -> None:
        self.k = check_k(self.name, k, self.num_experts)

    def experts_per_token(self, tokens_per_group: int) -> float:
        return float(self.k)

    def flops_per_token(self, tokens_per_group: int) -> float:
        return 0.0

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        total = tokens.shape[0]
        chosen = random_experts(total, self.num_experts, self.k, self.seed, tokens.device)
        token = torch.arange(total, device=tokens.device).repeat_interleave(self.k)
        probs = tokens.new_full((total, self.num_experts), 1.0 / self.num_experts)
        weight = tokens.new_full((total * self.k,), 1.0 / self.k)
        return sparse_routing(probs, token, chosen.reshape(-1), weight, n)

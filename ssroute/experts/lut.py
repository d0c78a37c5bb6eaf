"""Look-up-table experts: quantize a token to a key, return the learned vector stored there.

The research notes ask for "some sort of look-up — CPU friendly" in place of an
MLP expert. Each expert ``e`` owns a value table ``values [experts, keys, dim]``;
a row routed to ``e`` is turned into a key and the expert's output is
``values[e, key]`` — a gather, no ``dim x hidden`` matrix multiply. This is the
memory layer idea of Lample et al. 2019 ("Large Memory Layers with Product
Keys") reduced to one key per row, and the VQ bottleneck of van den Oord et al.
2017 for the key. Two ways to compute the key:

- ``key="codebook"``: nearest of ``num_keys`` codes ``codebook [experts, keys,
  key_dim]`` (after an optional learned projection ``dim -> key_dim``). In
  training the output is straight-through: the forward value is the hard
  look-up, the gradient is that of the softmax-weighted mix
  ``softmax(-dist / temperature) @ values``, so codes, projection and the
  incoming tokens all learn. In eval mode only ``argmin + gather`` runs.
- ``key="hash"``: the sign pattern of ``hash_bits`` fixed random projections
  (SimHash) read as an integer in ``[0, 2**hash_bits)``; only the values learn.

``hidden`` sets the number of codebook keys when ``num_keys`` is None (so the
table has as many entries per expert as an MLP expert has hidden units); the
hash key ignores it. Shapes: rows ``[rows, dim]`` -> keys ``[rows]`` -> ``[rows, dim]``.

>>> import torch
>>> bank = LUTExperts(dim=8, hidden=16, num_experts=3)
>>> bank(torch.randn(5, 8), [2, 0, 3], None).shape, tuple(bank.values.shape)
(torch.Size([5, 8]), (3, 16, 8))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.experts.base import EXPERTS, ExpertBank, ExpertContext


@EXPERTS.register("lut")
class LUTExperts(ExpertBank):
    """``E`` look-up-table experts.

    Args:
        dim: token width.
        hidden: number of keys per expert when ``num_keys`` is None (codebook key).
        num_experts: number of experts ``E``.
        key: ``codebook`` (nearest code) or ``hash`` (sign pattern of random projections).
        num_keys: codebook entries per expert; None = ``hidden``.
        key_dim: width of the codes; None = ``dim``. Must equal ``dim`` unless ``project``.
        project: learn a ``dim -> key_dim`` projection before the codebook look-up.
        temperature: softmax temperature of the straight-through gradient (codebook key).
        hash_bits: random projections of the hash key; the table has ``2**hash_bits`` entries.
        seed: seeds the hash projections.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        key: str = "codebook",
        num_keys: int | None = None,
        key_dim: int | None = None,
        project: bool = False,
        temperature: float = 1.0,
        hash_bits: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(dim, hidden, num_experts)
        if key not in ("codebook", "hash"):
            raise ConfigError(f"experts lut: key={key!r} is not valid; choose codebook or hash.")
        key_dim = dim if key_dim is None else int(key_dim)
        if key == "codebook" and key_dim != dim and not project:
            raise ConfigError(f"experts lut: key_dim={key_dim} differs from the token width dim={dim}; set key_dim={dim} or project=true.")
        if not 1 <= hash_bits <= 20:
            raise ConfigError(f"experts lut: hash_bits={hash_bits} must be between 1 and 20 (the table has 2**hash_bits rows).")
        if temperature <= 0:
            raise ConfigError(f"experts lut: temperature={temperature} must be positive.")
        self.key, self.key_dim, self.temperature = key, key_dim, float(temperature)
        keys = (num_keys or hidden) if key == "codebook" else 2**hash_bits
        if keys < 1:
            raise ConfigError(f"experts lut: num_keys={num_keys} must be a positive integer.")
        self.num_keys = keys
        self.proj = nn.Linear(dim, key_dim, bias=False) if key == "codebook" and project else None
        # Tokens reach the FFN LayerNormed (unit scale per coordinate), so unit-normal codes start near them.
        self.codebook = nn.Parameter(torch.randn(num_experts, keys, key_dim)) if key == "codebook" else None
        self.values = nn.Parameter(0.02 * torch.randn(num_experts, keys, dim))
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(dim, hash_bits, generator=generator), persistent=False)
        self.register_buffer("powers", 2 ** torch.arange(hash_bits), persistent=False)

    def flops_per_row(self, tokens_per_image: int) -> float:
        if self.key == "hash":
            return 2.0 * self.dim * self.planes.shape[1]
        project = 2.0 * self.dim * self.key_dim if self.proj is not None else 0.0
        return project + 2.0 * self.key_dim * self.num_keys  # distances to the codes; the gather is free

    def keys_of(self, rows: Tensor, expert: int) -> tuple[Tensor, Tensor | None]:
        """``[rows]`` key index of each row for ``expert``, and the ``[rows, keys]`` code distances (codebook key)."""
        if self.key == "hash":
            return (((rows.detach() @ self.planes.to(rows.dtype)) > 0).long() * self.powers).sum(-1), None
        q = self.proj(rows) if self.proj is not None else rows
        distance = torch.cdist(q, self.codebook[expert])
        return distance.detach().argmin(-1), distance

    def forward(self, x: Tensor, sizes: list[int], context: ExpertContext | None) -> Tensor:
        values = self.values.unbind(0)
        straight_through = self.training and self.key == "codebook" and torch.is_grad_enabled()
        outputs = []
        for e, rows in enumerate(x.split(sizes)):
            if rows.shape[0] == 0:
                outputs.append(rows)
                continue
            key, distance = self.keys_of(rows, e)
            hard = values[e].index_select(0, key)
            if straight_through:
                soft = torch.softmax(-distance.square() / self.temperature, dim=-1) @ values[e]
                hard = hard + soft - soft.detach()  # value: the look-up; gradient: the soft mix
            outputs.append(hard)
        return torch.cat(outputs)

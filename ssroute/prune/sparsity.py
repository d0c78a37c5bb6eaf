"""Sparsity as real parameter counts: what the physically pruned backbone would hold.

:func:`param_count` counts every parameter of the backbone (patch projection,
norms, attention, FFNs or experts and their routers, the final norm) as a
function of how much of each gate is kept. Each size is a sum of gates — kept
heads ``H' = z_mha * sum z_head``, hidden units ``W' = z_ffn * sum z_unit``,
experts ``E' = sum z_expert``, hidden dimension ``D' = sum z_hidden`` — and the
count is *multilinear* in independent gates (``4 * head_dim * H' * D'`` for an
attention layer, ``E' * (2 * D' * W' + W')`` for an expert bank, ...), so:

- with the deterministic masks' keep indicators (``z != 0``) it is the exact
  parameter count of the pruned model (tested against ``numel`` after
  :mod:`ssroute.prune.surgery`, and against a hand count);
- with ``P(z != 0)`` (:meth:`~ssroute.prune.hard_concrete.HardConcrete.prob_nonzero`)
  it is the *expected* count under the hard-concrete distribution — the
  expectation of a multilinear function of independent gates is the function
  of their expectations — which CoFI's Lagrangian drives to the target.

The shared hidden dimension counts wherever it is used: a removed coordinate
removes a row or column of every matrix, norm and bias it touches.

>>> from ssroute.models.vit import ViT
>>> from ssroute.prune.shapes import describe
>>> vit = ViT(image_size=8, channels=1, dim=16, depth=2, heads=4, patch_size=2)
>>> shape = describe(vit)
>>> float(param_count(shape, {})["total"]) == sum(p.numel() for p in vit.parameters())
True
>>> round(sparsity(shape, {"ffn": torch.tensor([0.0, 1.0])}), 3)  # one of two FFNs removed
0.232
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ssroute.prune.shapes import ModelShape


def param_count(shape: ModelShape, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{"total", "block<i>/attn", "block<i>/ffn"}`` parameters when gate ``name`` keeps ``keep[name]`` (absent = all kept)."""
    one = next(iter(keep.values())).new_ones(()) if keep else torch.ones(())

    def kept(name: str, size: int) -> Tensor:
        return keep[name].sum() if name in keep else one * size

    dim = kept("hidden", shape.dim)
    mha, ffn = keep.get("mha"), keep.get("ffn")
    out = {"total": dim * shape.stem_per_dim + 2 * dim + shape.fixed_params}  # patch stem, the final norm, what nothing prunes
    for i, b in enumerate(shape.blocks):
        heads = kept(f"heads_{i}", b.heads) * (mha[i] if mha is not None else 1.0)
        attn = 2 * dim + 4 * b.head_dim * heads * dim + 3 * b.head_dim * heads + dim  # norm1, qkv + proj weights, qkv bias, proj bias
        ffn_params = 2 * dim  # norm2
        if b.kind == "other":
            ffn_params = ffn_params + b.fixed_params
        else:
            width = kept(f"units_{i}", b.width) * (ffn[i] if ffn is not None else 1.0)
            if b.kind == "dense":
                ffn_params = ffn_params + 2 * width * dim + width + dim
            else:
                experts = kept(f"experts_{i}", b.experts)
                ffn_params = ffn_params + experts * (2 * dim * width + width) + (dim if b.shared_bias else experts * dim)
                ffn_params = ffn_params + _router_params(b, experts, dim)
        out[f"block{i}/attn"], out[f"block{i}/ffn"] = attn, ffn_params
        out["total"] = out["total"] + attn + ffn_params
    return out


def _router_params(block, experts: Tensor, dim: Tensor) -> Tensor | int:
    if block.router == "token_choice":
        return experts * dim  # the bias-free gate [experts, dim]
    if block.router == "mlp_selection":
        hidden = block.router_hidden
        return hidden * dim + hidden + hidden * experts + experts
    return block.router_params


def sparsity(shape: ModelShape, keep: Mapping[str, Tensor]) -> float:
    """Share of the backbone's parameters removed (``1 - kept / all``)."""
    return float(expected_sparsity(shape, keep))


def expected_sparsity(shape: ModelShape, keep: Mapping[str, Tensor]) -> Tensor:
    """``1 - count(keep) / count(all)`` as a tensor, differentiable in ``keep`` (the Lagrangian's input)."""
    return 1.0 - param_count(shape, keep)["total"] / param_count(shape, {})["total"]

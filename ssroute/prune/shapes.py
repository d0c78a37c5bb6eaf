"""What a ViT's prunable structures are: heads, FFN hidden units, experts and the hidden dimension, per block.

:func:`describe` reads a :class:`~ssroute.models.vit.ViT` (dense, routed or already
pruned) into a :class:`ModelShape`, the one description the masks
(:mod:`ssroute.prune.masks`), the parameter count (:mod:`ssroute.prune.sparsity`)
and the physical removal (:mod:`ssroute.prune.surgery`) share, and says which
structures the model supports and why not the others:

- ``mha`` / ``heads``: whole attention layers and their heads (every block);
- ``ffn`` / ``units``: whole FFNs and their hidden units — the dense FFN's, or
  an MoE layer's ``mlp`` experts' (two-layer experts only; one mask per unit
  *rank*, shared by the experts of the layer, after each expert's units are
  sorted by weight magnitude, so experts narrow together and keep their stacked layout);
- ``experts``: whole experts of MoE layers whose router can mask experts
  (``Router.maskable_experts``: token choice, MLP selection);
- ``hidden``: the token width shared by every block (CoFI's hidden dimension),
  when every router can be narrowed (:data:`NARROWABLE_ROUTERS`) and the model
  has no other width-dependent parameter.

>>> from ssroute.models.vit import ViT
>>> shape = describe(ViT(image_size=8, channels=1, dim=16, depth=2, heads=4, patch_size=2))
>>> shape.dim, [b.heads for b in shape.blocks], [b.width for b in shape.blocks], sorted(shape.supported)
(16, [4, 4], [32, 32], ['ffn', 'heads', 'hidden', 'mha', 'units'])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ssroute.errors import ConfigError
from ssroute.experts.mlp import MLPExperts
from ssroute.layers.attention import Attention
from ssroute.layers.mlp import FeedForward
from ssroute.moe import MoELayer

STRUCTURES = ("mha", "heads", "ffn", "units", "experts", "hidden")
NARROWABLE_ROUTERS = ("token_choice", "mlp_selection")  # routers whose only width-dependent weights the surgery knows


@dataclass
class BlockShape:
    """One transformer block's prunable sizes."""

    heads: int  # attention heads
    head_dim: int  # width of one head
    kind: str  # dense, moe (mlp experts of depth 2) or other (an FFN the pruning leaves whole)
    width: int  # FFN hidden units (dense) or one expert's (moe); 0 for other
    experts: int = 0  # experts of an MoE layer
    shared_bias: bool = False  # moe: one output bias shared by the experts (upcycled banks)
    router: str | None = None  # moe: the router's registered name
    router_hidden: int = 0  # mlp_selection: the selector MLP's hidden width
    router_params: int = 0  # moe: the router's parameters (counted as they are for routers the pruning does not narrow)
    maskable_experts: bool = False  # moe: the router can mask experts out
    fixed_params: int = 0  # parameters no structure touches (an FFN left whole)


@dataclass
class ModelShape:
    """A ViT's prunable sizes and the structures it supports (name -> why not, for the others)."""

    dim: int
    stem_per_dim: int  # patch-stem parameters per token dimension (channels * patch_size^2 weights + a bias); 0 for a conv stem
    blocks: list[BlockShape]
    fixed_params: int = 0  # parameters outside the blocks no structure touches (a convolutional stem, a selector's)
    supported: set[str] = field(default_factory=set)
    unsupported: dict[str, str] = field(default_factory=dict)


def _ffn_shape(ffn: nn.Module, heads: int, head_dim: int) -> tuple[BlockShape, str | None]:
    if isinstance(ffn, FeedForward):
        return BlockShape(heads, head_dim, "dense", ffn.fc1.out_features), None
    if isinstance(ffn, MoELayer) and isinstance(ffn.experts, MLPExperts) and ffn.experts.depth == 2:
        router = ffn.router
        block = BlockShape(heads, head_dim, "moe", ffn.experts.hidden, ffn.num_experts, ffn.experts.out_bias == "shared", router.name)
        block.maskable_experts = bool(router.maskable_experts) and not getattr(router, "random", False)
        block.router_params = sum(p.numel() for p in router.parameters())
        if router.name == "mlp_selection":
            block.router_hidden = router.mlp[0].out_features
        if router.name not in NARROWABLE_ROUTERS:
            return block, f"router {router.name} has width-dependent weights the pruning cannot narrow"
        if getattr(getattr(router, "gate", None), "cosine_scale", None) is not None:
            return block, "a cosine router gate normalises over the whole width, so narrowing it changes the routing"
        return block, None
    params = sum(p.numel() for p in ffn.parameters())
    return BlockShape(
        heads, head_dim, "other", 0, fixed_params=params
    ), f"the FFN {type(ffn).__name__} is not a dense FFN or two-layer mlp experts"


def describe(backbone: nn.Module) -> ModelShape:
    """The prunable sizes of ``backbone`` and the structures it supports."""
    if not hasattr(backbone, "blocks") or not hasattr(backbone, "patch_embed") or hasattr(backbone, "stack"):
        raise ConfigError(
            "structured pruning supports model=vit backbones (dense, routed or pruned); this checkpoint's model is another kind."
        )
    blocks, reasons = [], []
    for block in backbone.blocks:
        if not isinstance(block.attn, Attention):
            raise ConfigError(
                f"structured pruning cannot prune a {type(block.attn).__name__} attention yet; prune a model without model.moa.layers."
            )
        shape, reason = _ffn_shape(block.ffn, block.attn.heads, block.attn.head_dim)
        blocks.append(shape)
        if reason:
            reasons.append(reason)
    proj = backbone.patch_embed.proj
    patch_stem = isinstance(proj, nn.Conv2d)
    per_dim = proj.weight[0].numel() + 1 if patch_stem else 0
    extra = (
        sum(p.numel() for p in backbone.parameters()) - sum(p.numel() for p in backbone.blocks.parameters()) - (per_dim + 2) * backbone.dim
    )
    shape = ModelShape(backbone.dim, per_dim, blocks, fixed_params=extra)
    shape.supported = {"mha", "heads"}
    if any(b.kind != "other" for b in blocks):
        shape.supported |= {"ffn", "units"}
    else:
        shape.unsupported["ffn"] = shape.unsupported["units"] = "no block has a dense FFN or mlp experts"
    if any(b.maskable_experts for b in blocks):
        shape.supported.add("experts")
    else:
        shape.unsupported["experts"] = "no MoE layer has a router that can mask experts (token_choice or trained mlp_selection)"
    if reasons:
        shape.unsupported["hidden"] = reasons[0]
    elif not patch_stem:
        shape.unsupported["hidden"] = "the convolutional stem (model.stem=conv) has width-dependent weights the pruning cannot narrow"
    elif extra:
        shape.unsupported["hidden"] = "the patch selector has width-dependent weights"
    else:
        shape.supported.add("hidden")
    return shape


def choose_structures(shape: ModelShape, requested: list[str] | None) -> list[str]:
    """The structures to prune: those requested (each must be supported), or every supported one."""
    if requested is None:
        return [s for s in STRUCTURES if s in shape.supported]
    unknown = [s for s in requested if s not in STRUCTURES]
    if unknown:
        raise ConfigError(f"structures={list(requested)} names unknown structure(s) {unknown}; choose from {list(STRUCTURES)}.")
    for name in requested:
        if name not in shape.supported:
            raise ConfigError(
                f"structures lists {name}, which this model cannot prune: {shape.unsupported[name]}; drop it from structures."
            )
    return [s for s in STRUCTURES if s in requested]

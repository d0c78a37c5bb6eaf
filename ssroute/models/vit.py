"""Vision transformer backbone (Dosovitskiy et al. 2021, arXiv 2010.11929), pre-norm, mean-pooled.

``images [batch, channels, height, width] -> tokens [batch, tokens, dim] -> features [batch, dim]``.
Blocks sit in a ``ModuleList`` and each block's FFN comes from ``ffn_factory(layer)``,
so an MoE layer can replace any block's FFN and blocks can be trained one at a time.

One forward serves every use: ``vit(images, end=b, frozen_below=a)`` runs the
blocks ``[0, b)``, those below ``a`` (and the patch embedding with them) without
autograd, and returns ``(features, aux)`` — the pooled features and a
:class:`ForwardAux` with each routed block's routing, the
patches and the auxiliary losses. Modules keep no per-step state for a training
loop to read back (as google-research/vmoe's routers return ``(dispatcher,
metrics)``): everything a loss, a log line or a metric needs from inside the
network is in ``aux``. The pool uses the final LayerNorm only after
the last block; a forward that stops earlier pools through a LayerNorm without
learned scale, so a layerwise stage never trains (or depends on) the norm of a
later one. ``segment`` substitutes the modules of the blocks ``[a, b)`` — what
a momentum teacher does with its own copies while sharing the frozen prefix.

>>> import torch
>>> vit = ViT(image_size=8, channels=1, dim=32, depth=2, heads=4, patch_size=2)
>>> features, aux = vit(torch.randn(5, 1, 8, 8))
>>> features.shape, vit(torch.randn(5, 1, 8, 8), end=1)[0].shape
(torch.Size([5, 32]), torch.Size([5, 32]))

With a patch selector (``ssroute.patches``) the tokens are the selected patches;
``aux.patches`` holds their centres ``[batch, N, 2]`` (and, for a halting
selector, the mask of patches taken, which attention and pooling obey).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.layers.block import TransformerBlock, init_weights
from ssroute.layers.mlp import FeedForward
from ssroute.layers.patch_embed import PatchEmbed
from ssroute.layers.rope import AxialRope
from ssroute.models.depth_router import DepthRoutedStack, DepthTrace, depth_router_options
from ssroute.models.registry import check_model, register_model
from ssroute.patches.base import Patches, PatchSelector
from ssroute.routing import Routing


@dataclass
class ForwardAux:
    """Everything a backbone forward computed besides the features.

    Attributes:
        routings: block index -> the routing of that block's MoE layer over the
            ``batch * tokens`` flat tokens (image by image).
        patches: the tokens' patches: centres ``[batch, tokens, 2]`` in view
            pixels, and for a halting selector the mask, pool weights and ponder cost.
        losses: auxiliary losses by name, each a scalar that joins the training
            loss: ``router_aux`` (the trainable MoE layers' balance and z losses),
            ``ponder`` (sequential patch selection), ``depth_ponder`` (ACT over depth).
        tokens: ``[batch, tokens, dim]`` after the last block that ran (before the pool's norm).
        block_tokens: ``[batch, tokens, dim]`` after each block that ran, when asked for.
        depth: routing over depth only (``model=vit_depth``, or a ``depth`` stage of a
            stack): this forward's choices (:class:`~ssroute.models.depth_router.DepthTrace`).
    """

    routings: dict[int, Routing] = field(default_factory=dict)
    patches: Patches | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    tokens: Tensor | None = None
    block_tokens: list[Tensor] | None = None
    depth: DepthTrace | None = None

    def rows_per_token(self) -> dict[int, float]:
        """Expert rows computed per token by each routed block in this forward (its measured k)."""
        return {i: r.token.numel() / max(r.num_tokens, 1) for i, r in self.routings.items() if not r.is_soft}


def router_aux_loss(routings: dict[int, Routing], trainable_from: int = 0) -> dict[str, Tensor]:
    """``{"router_aux": sum of aux_loss}`` over the routed blocks at or after ``trainable_from`` ({} if none)."""
    losses = [r.aux_loss.float() for i, r in routings.items() if i >= trainable_from]
    return {"router_aux": torch.stack(losses).sum()} if losses else {}


class Segment(nn.Module):
    """The modules a forward trains for the blocks ``[start, end)`` of a ViT.

    Args:
        patch_embed: the patch embedding when ``start == 0`` (None: it is in the frozen prefix).
        blocks: the blocks ``[start, end)``.
        norm: the final LayerNorm when ``end`` is the last block (None: the pool uses a norm without parameters).
    """

    def __init__(self, patch_embed: PatchEmbed | None, blocks: list[nn.Module], norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm


class ViT(nn.Module):
    """Patch embedding, ``depth`` transformer blocks, a final LayerNorm and mean pooling.

    Args:
        image_size: square image side in pixels.
        channels: image channels.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        patch_size: patch side in pixels (must divide ``image_size``).
        mlp_ratio: dense FFN hidden width as a multiple of ``dim``.
        activation: FFN activation (gelu, relu, silu).
        dropout: attention dropout.
        ffn_factory: ``layer index -> FFN module``; default a dense :class:`FeedForward`.
        selector: which patches become tokens (``ssroute.patches``); None = the non-overlapping grid.
        position: ``absolute`` (a sine-cosine code added to the tokens) or ``rope`` (rotary positions in
            attention only: tokens stay translation-equivariant, so routers see content, not position).
        stem: ``patch`` (one patch-sized convolution) or ``conv`` (a small convolutional stem).
        head_dim: width of one attention head; None = ``dim / heads``.
        block_heads: attention heads of each block (a pruned model); None = ``heads`` in every block.
        position_dims, position_width: the coordinates of a wider position code a model pruned over its
            hidden dimension keeps (:class:`~ssroute.layers.patch_embed.PatchEmbed`); None = the ``dim``-wide code.
        attention: ``softmax`` or ``relu`` attention in every block.
        attn_factory: ``layer index -> attention module or None`` (None: the block's own multi-head attention);
            a mixture of attention heads goes in here.
        block_factory: ``layer index -> module or None`` that takes that block's place (None: a transformer block);
            a :class:`~ssroute.models.depth_router.DepthRoutedStack` (routing over depth inside a stack) goes in here.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch_size: int = 2,
        mlp_ratio: float = 2.0,
        activation: str = "gelu",
        dropout: float = 0.0,
        ffn_factory: Callable[[int], nn.Module] | None = None,
        selector: PatchSelector | None = None,
        position: str = "absolute",
        stem: str = "patch",
        head_dim: int | None = None,
        block_heads: list[int] | None = None,
        position_dims: list[int] | None = None,
        position_width: int | None = None,
        attention: str = "softmax",
        attn_factory: Callable[[int], nn.Module | None] | None = None,
        block_factory: Callable[[int], nn.Module | None] | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        hidden = int(mlp_ratio * dim)
        if ffn_factory is None:
            ffn_factory = lambda layer: FeedForward(dim, hidden, activation)  # noqa: E731
        block_heads = [heads] * depth if block_heads is None else list(block_heads)
        if len(block_heads) != depth:
            raise ConfigError(f"model.shape.heads={block_heads} must give one head count per block (model.depth={depth}).")
        self.patch_embed = PatchEmbed(channels, patch_size, dim, image_size, selector, position, stem, position_dims, position_width)
        self.rope = AxialRope(head_dim or dim // heads, patch_size) if position == "rope" else None
        with warnings.catch_warnings():  # a pruned block may keep no heads or hidden units: empty weights initialise to nothing
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            attn_of = attn_factory or (lambda layer: None)
            self.blocks = nn.ModuleList(
                TransformerBlock(dim, block_heads[i], ffn_factory(i), dropout, head_dim, attention, attn_of(i)) for i in range(depth)
            )
            self.norm = nn.LayerNorm(dim)
            self.apply(init_weights)
        for i in range(depth):  # after the ViT's init, so a replacement keeps its own (a depth router's step prior)
            replacement = block_factory(i) if block_factory is not None else None
            if replacement is not None:
                self.blocks[i] = replacement

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def segment(self, start: int = 0, end: int | None = None) -> Segment:
        """The trainable modules of the blocks ``[start, end)`` (references to this ViT's own modules)."""
        end = self.depth if end is None else end
        return Segment(self.patch_embed if start == 0 else None, list(self.blocks[start:end]), self.norm if end == self.depth else None)

    def forward(
        self,
        images: torch.Tensor,
        *,
        end: int | None = None,
        frozen_below: int = 0,
        segment: Segment | None = None,
        keep_blocks: bool = False,
    ) -> tuple[torch.Tensor, ForwardAux]:
        """Features ``[batch, dim]`` after the blocks ``[0, end)`` and what the forward computed.

        Args:
            images: ``[batch, channels, height, width]`` normalised images.
            end: blocks to run (all by default).
            frozen_below: blocks below this index (and the patch embedding, if > 0) run without autograd.
            segment: modules to run in place of this ViT's own for the blocks ``[frozen_below, end)``.
            keep_blocks: also return every block's output tokens (``aux.block_tokens``).
        """
        end = self.depth if end is None else end
        own = segment is None
        patch_embed = self.patch_embed if own or frozen_below > 0 else segment.patch_embed
        trainable = self.blocks[frozen_below:end] if own else segment.blocks
        norm = (self.norm if own else segment.norm) if end == self.depth else None
        aux = ForwardAux(block_tokens=[] if keep_blocks else None)
        with torch.no_grad() if frozen_below > 0 else nullcontext():
            aux.patches = patch_embed.embed(images)
            x = self._run(aux.patches.tokens, self.blocks[:frozen_below], 0, aux)
        x = aux.tokens = self._run(x, trainable, frozen_below, aux)
        aux.losses.update(router_aux_loss(aux.routings, frozen_below))
        if aux.patches.aux_loss is not None:
            aux.losses["ponder"] = aux.patches.aux_loss
        return self.pool(x, aux.patches.pool_weights, norm), aux

    def _run(self, x: torch.Tensor, blocks, first: int, aux: ForwardAux) -> torch.Tensor:
        rope = None if self.rope is None else self.rope(aux.patches.centres)
        for index, block in enumerate(blocks, start=first):
            if getattr(block, "routes_over_depth", False):  # a pool of blocks routed over depth (DepthRoutedStack)
                x, aux.depth = block(x, aux.patches.mask, aux.patches.pool_weights, rope=rope)
                if aux.depth.ponder_loss is not None and torch.is_grad_enabled():  # not from a frozen stage
                    aux.losses["depth_ponder"] = aux.depth.ponder_loss
                routing = None
            else:
                x, routing = block(x, aux.patches.mask, rope)
            if routing is not None:
                aux.routings[index] = routing
            if aux.block_tokens is not None:
                aux.block_tokens.append(x)
        return x

    def encode(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        centres: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embedded tokens ``[batch, tokens, dim]`` through every block and the pool; ``mask`` False = padding;
        ``centres [batch, tokens, 2]`` the patches' centres (rotary positions; None = all at the origin)."""
        centres = tokens.new_zeros(*tokens.shape[:2], 2) if centres is None else centres
        aux = ForwardAux(patches=Patches(tokens, centres, mask, weights))
        return self.pool(self._run(tokens, self.blocks, 0, aux), weights, self.norm)

    def embed(self, images: torch.Tensor) -> Patches:
        """The patch embedding of a batch: tokens, centres (and mask, pool weights for a halting selector)."""
        return self.patch_embed.embed(images)

    @staticmethod
    def pool(tokens: torch.Tensor, weights: torch.Tensor | None = None, norm: nn.Module | None = None) -> torch.Tensor:
        """``norm`` (a LayerNorm without learned scale when None) and the mean over tokens
        (``weights [batch, tokens]`` summing to 1: a weighted mean) -> ``[batch, dim]``."""
        tokens = norm(tokens) if norm is not None else F.layer_norm(tokens, tokens.shape[-1:])
        if weights is None:
            return tokens.mean(dim=1)
        return torch.einsum("bnd,bn->bd", tokens, weights)


def token_options(model) -> dict:
    """The options of a ``model`` config every ViT shares (width, heads, patching, FFN ratio, position code) as constructor keywords."""
    return dict(
        dim=model.dim,
        heads=model.heads,
        patch_size=model.patch_size,
        mlp_ratio=model.mlp_ratio,
        activation=model.activation,
        dropout=model.dropout,
        stem=model.get("stem", "patch"),
        position=model.get("position", "absolute"),
    )


@register_model("vit")
def build_vit(cfg, image_size: int, channels: int, selector: PatchSelector | None) -> ViT:
    """The ``model=vit`` backbone of a run config: MoE FFNs in the blocks ``model.moe_layers`` (or the stack's route blocks)."""
    from ssroute.moe import build_moe

    model = cfg.model
    check_model(cfg)
    hidden = int(model.mlp_ratio * model.dim)
    moe_layers = set(model.moe_layers)
    layer_k = dict(zip(model.moe_layers, model.moe_k, strict=False))
    shape = model.get("shape") or {}  # configs written before pruning existed have none
    widths, experts_of = list(shape.get("ffn_hidden") or []), list(shape.get("experts") or [])
    moa = model.get("moa") or {}
    moa_layers = set(moa.get("layers") or [])

    def attn(layer: int) -> nn.Module | None:
        if layer not in moa_layers:
            return None
        from ssroute.moe.attention_heads import build_attention_heads

        head_dim = moa.get("head_dim") or model.dim // model.heads
        return build_attention_heads(
            model.dim, moa.get("heads", 8), moa.get("k", 2), head_dim, model.get("attention", "softmax"), model.dropout
        )

    depth_layers, depth = set(model.get("depth_layers") or []), model.depth_router

    def routed_over_depth(layer: int) -> nn.Module | None:
        if layer not in depth_layers:
            return None
        pool = depth.pool_blocks or model.ssl_layers
        return DepthRoutedStack(
            model.dim,
            model.heads,
            pool_blocks=pool,
            max_steps=depth.max_steps or pool,
            mlp_ratio=model.mlp_ratio,
            activation=model.activation,
            dropout=model.dropout,
            **depth_router_options(depth),
        )

    def ffn(layer: int) -> nn.Module:
        if layer not in moe_layers:
            return FeedForward(model.dim, widths[layer] if widths else hidden, model.activation)
        router, experts = dict(cfg.router), dict(cfg.experts)
        if layer in layer_k:
            router["k"] = layer_k[layer]
        return build_moe(
            dim=model.dim,
            hidden=widths[layer] if widths else model.expert_hidden or hidden,
            num_experts=experts_of[layer] if experts_of else model.num_experts,
            router=router.pop("name"),
            experts=experts.pop("name"),
            router_options=router,
            expert_options=experts,
            group_images=model.get("group_images", 1),
            router_context=model.get("router_context", 0.0),
        )

    return ViT(
        selector=selector,
        image_size=image_size,
        channels=channels,
        depth=model.depth,
        **token_options(model),
        ffn_factory=ffn,
        head_dim=shape.get("head_dim"),
        block_heads=list(shape["heads"]) if shape.get("heads") else None,
        position_dims=list(shape["position_dims"]) if shape.get("position_dims") else None,
        position_width=shape.get("position_width"),
        attention=model.get("attention", "softmax"),
        attn_factory=attn,
        block_factory=routed_over_depth,
    )

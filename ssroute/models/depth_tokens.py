"""One pool block applied to the tokens that chose it: per-token routing over depth.

With ``model.depth_router.per_token=true`` every token picks its own block at
each step, so the tokens of one image sit at different depths. Attention among
them is defined as: a token that applies block ``j`` at step ``s`` queries with
its own state, and its keys and values are **every** token of its image in the
state it has at the start of step ``s`` — whichever blocks those tokens took,
identities included. Every block of a step reads that same start-of-step
state and writes only its own tokens, so the blocks of one step commute. The
block's FFN then runs on its tokens alone. When every token of an image picks
the same block this is exactly the block on the whole image (tested), so
per-image routing is the special case of equal choices.

Execution, no loop over tokens: the chosen tokens are packed per image into a
padded ``[images, width, dim]`` query tensor (``width`` = the most tokens any
image sends to this block; one host sync), keys and values are projected from
the images' full token sets, one ``scaled_dot_product_attention`` runs with the
patch mask on the keys, and the outputs are scattered back with ``index_put``.

>>> import torch
>>> from ssroute.layers.block import TransformerBlock
>>> from ssroute.layers.mlp import FeedForward
>>> block = TransformerBlock(dim=8, heads=2, ffn=FeedForward(8, 16))
>>> x = torch.randn(2, 5, 8)
>>> every = torch.ones(2, 5, dtype=torch.bool)
>>> torch.allclose(block_on_tokens(block, x, x.clone(), every, torch.zeros(2, 5)), block(x)[0], atol=1e-6)
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssroute.layers.block import TransformerBlock
from ssroute.layers.rope import rotate


def block_on_tokens(
    block: TransformerBlock,
    source: Tensor,
    out: Tensor,
    chosen: Tensor,
    gate: Tensor,
    mask: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Write ``block`` applied to the ``chosen [B, N]`` tokens of ``source [B, N, dim]`` into ``out``; returns ``out``.

    ``gate [B, N]`` is the zero-valued straight-through gate ``p - sg(p)`` that carries the router's gradient;
    ``mask [B, N]`` False marks padding no token attends to; ``rope`` the rotary code ``(cos, sin)``, each
    ``[B, 1, N, head_dim]``: a query turns by its own position, a key by its token's.
    """
    image, position = chosen.nonzero(as_tuple=True)  # image-major, so each image's tokens are contiguous
    if image.numel() == 0:
        return out
    images, row = torch.unique_consecutive(image, return_inverse=True)
    counts = torch.bincount(row)
    slot = torch.arange(image.numel(), device=image.device) - (torch.cumsum(counts, 0) - counts).index_select(0, row)
    width = int(counts.max())  # the padded query width: one host sync
    dim, attn = source.shape[-1], block.attn
    context = block.norm1(source.index_select(0, images))  # [A, N, dim]: keys and values at the start of the step
    before = source[image, position]  # [T, dim]
    queries = context.new_zeros(images.numel(), width, dim).index_put((row, slot), block.norm1(before))
    heads, head = attn.heads, dim // attn.heads
    q = F.linear(queries, attn.qkv.weight[:dim], attn.qkv.bias[:dim]).view(images.numel(), width, heads, head).transpose(1, 2)
    kv = F.linear(context, attn.qkv.weight[dim:], attn.qkv.bias[dim:]).view(images.numel(), -1, 2, heads, head).permute(2, 0, 3, 1, 4)
    if rope is not None:
        query_rope = [r.new_zeros(images.numel(), width, r.shape[-1]).index_put((row, slot), r[image, 0, position])[:, None] for r in rope]
        q = rotate(q, *query_rope)
        kv = torch.stack([rotate(kv[0], *(r.index_select(0, images) for r in rope)), kv[1]])
    keys = None if mask is None else mask.index_select(0, images)[:, None, None, :]
    attended = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=keys, dropout_p=attn.dropout if attn.training else 0.0)
    attended = attn.proj(attended.transpose(1, 2).reshape(images.numel(), width, dim))[row, slot]  # [T, dim]
    after = before + attended
    after = after + block.ffn(block.norm2(after))
    after = after + gate[image, position].to(after.dtype)[:, None] * (after - before)
    return out.index_put((image, position), after)

"""How alike are the experts of an MoE layer? Every expert run on the same tokens, their outputs compared.

Specialisation shows in two places: *which* tokens an expert gets (the class x
expert NMI of ``ssroute.eval.analytics``) and *what* it computes. For the
second, each MoE layer's input tokens on a set of images are captured (a
forward pre-hook on its router: the exact rows the layer routes), and every
expert is applied to all of them — each expert sees every token of every
image, so attention and conv experts get whole images as context. Per pair of
experts ``(i, j)``:

- ``cosine``: the mean over tokens of the cosine similarity of the two outputs
  for the same token (1 = the experts compute the same vectors);
- ``cka``: linear CKA (Kornblith et al. 2019, ``ssroute.eval.cka``) between the
  two ``[tokens, dim]`` output matrices (1 = the same representation up to a
  rotation and scale).

Metrics: ``block{i}/expert_output_cosine`` and ``block{i}/expert_output_cka``,
the means over pairs ``i != j``. Experts trained on random tokens see the same
input distribution, so random routing should push both towards 1.

>>> import torch
>>> from ssroute.moe import build_moe
>>> moe = build_moe(dim=8, hidden=16, num_experts=3)
>>> with torch.no_grad():  # expert 1 becomes a copy of expert 0
...     for weights in (moe.experts.w_in, moe.experts.b_in, moe.experts.w_out, moe.experts.b_out):
...         _ = weights[1].copy_(weights[0])
>>> cosine, cka = pairwise_similarity(moe, torch.randn(2 * 5, 8), tokens_per_image=5)
>>> round(float(cosine[0, 1]), 4), round(float(cka[0, 1]), 4), bool(cosine[0, 2] < 1)
(1.0, 1.0, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssroute.eval.cka import linear_cka
from ssroute.eval.features import evaluating
from ssroute.experts import ExpertContext
from ssroute.moe import MoELayer, moe_layers


@torch.no_grad()
def pairwise_similarity(moe: MoELayer, tokens: Tensor, tokens_per_image: int) -> tuple[Tensor, Tensor]:
    """``([E, E] mean cosine, [E, E] linear CKA)`` of the experts' outputs on ``tokens [images * tokens_per_image, dim]``."""
    count, experts = tokens.shape[0], moe.num_experts
    token_index = torch.arange(count, device=tokens.device).repeat(experts)
    context = ExpertContext(token_index, tokens_per_image, count // tokens_per_image)
    outputs = moe.experts(tokens.repeat(experts, 1), [count] * experts, context).view(experts, count, -1).float()
    unit = F.normalize(outputs, dim=-1)
    cosine = torch.einsum("itd,jtd->ij", unit, unit) / count
    cka = torch.ones(experts, experts, dtype=torch.float64)
    for i in range(experts):
        for j in range(i + 1, experts):
            cka[i, j] = cka[j, i] = linear_cka(outputs[i].cpu(), outputs[j].cpu())
    return cosine.cpu(), cka


def moe_inputs(backbone: nn.Module, images_normalised: Tensor, batch_size: int = 256) -> dict[int, Tensor]:
    """Block index -> ``[images * tokens, dim]`` the rows each MoE layer routed, captured at its router."""
    layers = moe_layers(backbone)
    captured: dict[int, list[Tensor]] = {block: [] for block in layers}
    hooks = [
        layer.router.register_forward_pre_hook(lambda module, args, block=block: captured[block].append(args[0].detach()))
        for block, layer in layers.items()
    ]
    try:
        with evaluating(backbone), torch.no_grad():
            for chunk in images_normalised.split(batch_size):
                backbone(chunk)
    finally:
        for hook in hooks:
            hook.remove()
    return {block: torch.cat(rows) for block, rows in captured.items() if rows}


def expert_similarity(backbone: nn.Module, images_normalised: Tensor, max_tokens: int = 8192) -> dict[str, float]:
    """``block{i}/expert_output_cosine`` and ``block{i}/expert_output_cka`` on the first images (at most ``max_tokens`` tokens)."""
    metrics: dict[str, float] = {}
    layers = moe_layers(backbone)
    for block, rows in moe_inputs(backbone, images_normalised).items():
        per_image = rows.shape[0] // images_normalised.shape[0]
        images = max(1, min(images_normalised.shape[0], max_tokens // per_image))
        with evaluating(layers[block]):
            cosine, cka = pairwise_similarity(layers[block], rows[: images * per_image], per_image)
        off = ~torch.eye(cosine.shape[0], dtype=torch.bool)
        if off.any():
            metrics[f"block{block}/expert_output_cosine"] = float(cosine[off].mean())
            metrics[f"block{block}/expert_output_cka"] = float(cka[off].mean())
    return metrics

"""Image-level routing: every token of an image goes to the experts its whole image chose.

Mobile V-MoE (Daxberger et al. 2023, "Mobile V-MoEs: Scaling Down Vision
Transformers via Sparse Mixture-of-Experts", arXiv 2309.04354) routes whole
images instead of patches: the router sees the image's pooled representation
(here the mean of its tokens), picks ``k`` experts, and all of the image's
tokens run through them — a per-image choice of sub-network continuation. The
router can also be trained to predict a *super-class* of the image: the
training loop adds a cross-entropy of the returned ``image_probs`` to the
super-class ids (``ssroute.objectives.superclass``).

The MoE layer passes ``tokens_per_group`` = tokens per image, so a group is an
image. The image's top-k choice is expanded to (token, expert, weight) triples,
which the one sort-and-gather execution path runs unchanged; ``probs`` repeats
the image's distribution on each of its tokens, and :class:`ImageRouting` also
carries it once per image (``image_probs``) for image-level losses.

Shapes: tokens ``[images * tokens, dim]`` -> pooled ``[images, dim]`` -> logits
``[images, experts]`` -> pairs ``[images * tokens * k]``. No capacity limit: an
image is never split, so nothing is dropped.

>>> import torch
>>> router = ImageRouter(dim=8, num_experts=4, k=2)
>>> routing = router(torch.randn(3 * 5, 8), tokens_per_group=5)
>>> routing.image_probs.shape, routing.token.shape, int(routing.num_dropped)
(torch.Size([3, 4]), torch.Size([30]), 0)
>>> bool((routing.expert.view(3, 5, 2) == routing.expert.view(3, 5, 2)[:, :1]).all())  # one choice per image
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssroute.routing.base import Routing, register_router, sparse_routing
from ssroute.routing.losses import balance_losses
from ssroute.routing.token_choice import NoisyTopKRouter, noisy_top_k


@dataclass
class ImageRouting(Routing):
    """A :class:`Routing` decided per image; ``image_probs`` ``[images, experts]`` is each image's distribution and
    ``pooled`` ``[images, dim]`` the mean token it was decided from."""

    image_probs: Tensor | None = None
    pooled: Tensor | None = None

@register_router("image")
class ImageRouter(NoisyTopKRouter):
    """Top-k experts per image from the mean of its tokens (Mobile V-MoE).

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        k: experts per image (settable later with :meth:`set_k`).
        noise_std: std of Gaussian noise on the image logits in training;
            None = ``1 / E`` (V-MoE's default), 0 = off.
        importance_weight: weight of the importance loss over images.
        load_weight: weight of the load loss over images.
        z_loss_weight: weight of the router z-loss.
        normalize_weights: rescale an image's kept top-k gates to sum to 1 (needs k >= 2).
        cosine_scale: None = a linear gate; a number = a cosine gate with this scale.
    """

    per_token = False

    def flops_per_token(self, tokens_per_group: int) -> float:
        # the mean pool adds each token once; the gate runs once per image, shared by its tokens
        return float(self.dim) + 2.0 * self.dim * self.num_experts / tokens_per_group

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> ImageRouting:
        n = self.group_size(tokens, tokens_per_group)
        images = tokens.shape[0] // n
        noise = self.noise_std if self.training else 0.0
        pooled = tokens.reshape(images, n, self.dim).mean(dim=1)
        logits = self.gate(pooled)
        g = noisy_top_k(logits, self.k, noise, self.normalize_weights)  # rows are images
        image_probs = g.probs
        # token t of image i takes image i's k choices, pairs ordered token-major like token choice's
        token = torch.arange(images * n, device=tokens.device).repeat_interleave(self.k)
        expert = g.chosen.repeat_interleave(n, dim=0).reshape(-1)
        weight = g.gates.repeat_interleave(n, dim=0).reshape(-1)
        aux = balance_losses(  # balance over the batch's images: an image is one row
            logits,
            image_probs,
            g.chosen,
            noisy_logits=g.noisy,
            noise_std=noise,
            importance_weight=self.importance_weight,
            load_weight=self.load_weight,
            z_loss_weight=self.z_loss_weight,
        )
        probs = image_probs.repeat_interleave(n, dim=0)
        base = sparse_routing(probs, token, expert, weight, n, aux)
        return ImageRouting(**{name: getattr(base, name) for name in base.__dataclass_fields__}, image_probs=image_probs, pooled=pooled.detach())

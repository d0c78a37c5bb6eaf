"""The Python face of a pretrained model: ``ssroute.load(run folder | .ckpt | latest | exported folder)``.

:func:`load` gives a :class:`PretrainedBackbone` in eval mode that takes uint8
(or [0, 1] float) images ``[batch, channels, height, width]``, normalises them
as its training did, and answers three questions:

- ``embed(images) -> [batch, dim]``: the pooled features (what kNN, linear
  probes and fine-tuning use; ``model(images)`` is the same);
- ``tokens(images) -> [batch, tokens, dim]``: every patch token after the final
  LayerNorm (the features are their mean, or weighted mean for halting selectors);
- ``route(images) -> {block: LayerRoute}``: for each routed block, each
  patch's executed experts by decreasing combine weight, those weights, the
  router's distribution over all experts and the patch centres — what the
  routing of a mixture-of-experts ViT (V-MoE, Riquelme et al. 2021,
  arXiv 2106.05974) decided for every patch.

Loading an exported folder (``python -m ssroute.export``) needs neither
Lightning nor Hydra: ``config.json`` and ``model.safetensors`` rebuild the same
backbone with the same weights, so outputs are bit-identical to the checkpoint's.

>>> import torch
>>> from ssroute.checkpoint import ModelInputs
>>> from ssroute.models.vit import ViT
>>> model = PretrainedBackbone(ViT(image_size=8, channels=1, dim=16, depth=2, heads=2, patch_size=2), ModelInputs(8, 1, (0.3,), (0.4,)), {})
>>> images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
>>> model.embed(images).shape, model.tokens(images).shape, model.route(images)
(torch.Size([3, 16]), torch.Size([3, 16, 16]), {})
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssroute.checkpoint import ModelInputs
from ssroute.data.views import normalize
from ssroute.errors import ConfigError
from ssroute.routing import Routing


@dataclass
class LayerRoute:
    """What one routed block decided for every patch of a batch (``k``: the most experts any patch got).

    Image routers route whole images: every patch of an image carries the image's experts.
    """

    experts: Tensor  # [batch, tokens, k] long: executed experts by decreasing combine weight; -1 where a patch got fewer
    weights: Tensor  # [batch, tokens, k] float: their combine weights (0 where -1)
    probs: Tensor  # [batch, tokens, experts] float: the router's distribution over every expert
    centres: Tensor  # [batch, tokens, 2] float: (x, y) pixel centres of the patches


def layer_route(routing: Routing, centres: Tensor) -> LayerRoute:
    """The :class:`LayerRoute` of one block's :class:`~ssroute.routing.Routing` over ``centres [batch, tokens, 2]``."""
    batch, tokens = centres.shape[:2]
    mass = routing.executed_mass()  # [routed tokens, experts]; image routers route one token per image
    k = max(int((mass > 0).sum(dim=1).max()), 1) if mass.numel() else 1
    weights, experts = mass.topk(k, dim=1)
    experts = torch.where(weights > 0, experts, torch.full_like(experts, -1))
    per_image = mass.shape[0] // batch
    shape = lambda x: x.reshape(batch, per_image, -1).expand(batch, tokens, -1)  # noqa: E731  (per image -> per patch)
    return LayerRoute(shape(experts), shape(weights), shape(routing.probs.detach().float()), centres)


class PretrainedBackbone(nn.Module):
    """A trained backbone with the normalisation of its inputs, in eval mode.

    Args:
        backbone: the ssroute backbone (forward: normalised images -> ``(features, ForwardAux)``).
        inputs: image size, channels and the per-channel mean and std it was trained with.
        config: the sections of the run config that built it (``model``, ``router``, ``experts``, ``patches``, ...).
    """

    def __init__(self, backbone: nn.Module, inputs: ModelInputs, config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.inputs = inputs
        self.config = config
        self.register_buffer("mean", torch.tensor(inputs.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(inputs.std).view(1, -1, 1, 1), persistent=False)
        self.eval()

    @property
    def dim(self) -> int:
        return self.backbone.dim

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 or [0, 1] float images -> the normalised model input, after checking their shape."""
        size, channels = self.inputs.image_size, self.inputs.channels
        if images.ndim != 4 or images.shape[1] != channels or tuple(images.shape[2:]) != (size, size):
            raise ValueError(
                f"images have shape {list(images.shape)}; this model takes [batch, {channels}, {size}, {size}] (uint8 or floats in [0, 1])."
            )
        return normalize(images.to(self.mean.device), self.mean, self.std)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(images)

    def embed(self, images: Tensor) -> Tensor:
        """``[batch, dim]`` pooled features."""
        return self.backbone(self.normalize(images))[0]

    def tokens(self, images: Tensor) -> Tensor:
        """``[batch, tokens, dim]`` patch tokens after the last block and the final LayerNorm."""
        _, aux = self.backbone(self.normalize(images), keep_blocks=True)
        return self.backbone.norm(aux.block_tokens[-1])

    def route(self, images: Tensor) -> dict[int, LayerRoute]:
        """Block index -> :class:`LayerRoute` for every routed block ({} for a dense model)."""
        _, aux = self.backbone(self.normalize(images))
        return {block: layer_route(routing, aux.patches.centres) for block, routing in sorted(aux.routings.items())}


def load(path: str | Path) -> PretrainedBackbone:
    """A pretrained backbone from a run folder, a ``.ckpt`` file, ``latest`` or a folder that ``python -m ssroute.export`` wrote."""
    from omegaconf import OmegaConf

    from ssroute.checkpoint import load_backbone_state, read_checkpoint, resolve_checkpoint
    from ssroute.export_folder import check_export_weights, is_export, read_export
    from ssroute.models import build_backbone

    if is_export(path):
        config, state, inputs = read_export(path)
        backbone = build_backbone(OmegaConf.create(config), inputs.image_size, inputs.channels)
        check_export_weights(backbone, state, path)
    else:
        if Path(path).is_dir() and not (Path(path) / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(
                f"{path} is neither a run folder (checkpoints/last.ckpt) nor an exported folder (config.json and model.safetensors); "
                "pass the folder that python -m pretrain or python -m ssroute.export printed, or a .ckpt file."
            )
        file = resolve_checkpoint(str(path))
        config, state, inputs = read_checkpoint(str(file))
        backbone = build_backbone(OmegaConf.create(config), inputs.image_size, inputs.channels)
        load_backbone_state(backbone, state, file)
    return PretrainedBackbone(backbone, inputs, config)


__all__ = ["LayerRoute", "PretrainedBackbone", "load"]

"""Routing stability under augmentation, by augmentation family and as a curve over strength.

Over ``pairs`` rounds of two independently augmented views of every image, for
every MoE block: top-1 agreement of corresponding patches (partners from the
views' matrices, ``ssroute.data.correspondence``), the mean Jensen-Shannon
divergence of their routing distributions, and the chance agreement of the same
usage (``ssroute.eval.routing_stability.RoutingStabilityMeter``). Measured
three ways:

- with the run's augmentation: ``block{i}/routing_agreement``, ``/routing_js``,
  ``/routing_agreement_chance`` and their means over blocks (plain keys;
  expert usage is in ``ssroute.eval.analytics``);
- one augmentation family at a time (:data:`FAMILIES`: crop, flip, rotation,
  colour, blur_noise), everything else off: ``block{i}/family/{name}/...``.
  A family the run leaves off is measured at a reference magnitude
  (:data:`REFERENCE`), and ``family/{name}/in_run`` says which;
- every family scaled by a strength ``s`` (:func:`scale_augment`): 0 is the
  identity (a deterministic router agrees with itself: 1.0), 1 the run's
  augmentation, above 1 stronger: ``block{i}/strength/{s}/...``, also as
  ``curves["block{i}"]`` (agreement) and ``curves["block{i}/chance"]``.

Routers with ``per_token = False`` route whole images: their agreement is
image-level (the top-1 expert of an image's mean routing distribution, same in
both views), with every image its own partner.

>>> import torch
>>> from ssroute.config import AugmentConfig
>>> scaled = scale_augment(AugmentConfig(crop_scale=(0.5, 1.0), rotation=10.0, noise=0.1), 0.5)
>>> scaled.crop_scale, scaled.rotation, scaled.noise
((0.75, 1.0), 5.0, 0.05)
>>> scale_augment(AugmentConfig(), 0.0) == IDENTITY
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ssroute.config import AugmentConfig
from ssroute.data.views import ViewAugment
from ssroute.errors import ConfigError
from ssroute.eval.routing_stability import RoutingStabilityMeter
from ssroute.layers.moe import MoELayer, record_routing
from ssroute.train.routing import view_matches

# Every family off: crops take the whole image, no flip, rotation, colour, blur or noise.
IDENTITY = AugmentConfig(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, rotation=0.0, color_jitter=0.0, grayscale=0.0, blur=0.0, noise=0.0
)

# Magnitudes for a family the run leaves off, so its effect on routing is still measured.
REFERENCE = AugmentConfig(
    crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.333), hflip=0.5, rotation=15.0, color_jitter=0.4, grayscale=0.2, blur=0.5, noise=0.05
)

# family name -> the AugmentConfig fields that belong to it
FAMILIES: dict[str, tuple[str, ...]] = {
    "crop": ("crop_scale", "crop_ratio"),
    "flip": ("hflip",),
    "rotation": ("rotation",),
    "colour": ("color_jitter", "color_jitter_p", "grayscale"),
    "blur_noise": ("blur", "noise"),
}


@dataclass
class StabilityResult:
    metrics: dict[str, float]  # flat block{i}/..., family/..., strength/... keys (see the module docstring)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # block{i}[/chance] -> [(strength, agreement)]


def as_augment_config(cfg) -> AugmentConfig:
    """An :class:`AugmentConfig` from a dataclass, a DictConfig or a dict (unknown keys are a ConfigError)."""
    if isinstance(cfg, AugmentConfig):
        return cfg
    values = dict(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg)
    unknown = sorted(set(values) - {f.name for f in fields(AugmentConfig)})
    if unknown:
        raise ConfigError(f"augmentation config has unknown keys {unknown}; pass data.augment of the run's config.")
    return AugmentConfig(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in values.items()})


def family_only(run: AugmentConfig, family: str) -> tuple[AugmentConfig, bool]:
    """The identity with only ``family`` on, at the run's magnitude (or :data:`REFERENCE` when the run has it off); and whether the run has it on."""
    names = FAMILIES[family]
    in_run = not all(getattr(run, n) == getattr(IDENTITY, n) for n in names if n != "color_jitter_p")
    source = run if in_run else REFERENCE
    return replace(IDENTITY, **{n: getattr(source, n) for n in names}), in_run


def scale_augment(run: AugmentConfig, strength: float) -> AugmentConfig:
    """Every family's magnitude scaled by ``strength`` (0 = identity, 1 = ``run``).

    Probabilities are capped at 1, the crop area kept in [0.05, 1] and colour
    jitter at 1 (kornia's brightness and contrast factors live in [0, 2]).
    """
    s = float(strength)
    if s < 0:
        raise ConfigError(f"augmentation strength {strength} must be >= 0 (0 = no augmentation, 1 = the run's).")
    low, high = (min(1.0, max(0.05, 1.0 - s * (1.0 - a))) for a in run.crop_scale)
    return replace(
        run,
        crop_scale=(low, high),
        crop_ratio=tuple(float(r) ** s for r in run.crop_ratio),
        hflip=min(1.0, s * run.hflip),
        rotation=s * run.rotation,
        color_jitter=min(1.0, s * run.color_jitter),
        grayscale=min(1.0, s * run.grayscale),
        blur=min(1.0, s * run.blur),
        noise=s * run.noise,
    )


def normalisation_of(
    normalize: Callable[[Tensor], Tensor], channels: int, device: torch.device | str = "cpu"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of an affine ``uint8 -> (x/255 - mean) / std`` normaliser on ``device``, read off its values at 0 and 255."""
    probe = torch.tensor([0, 255], dtype=torch.uint8, device=device).view(2, 1, 1, 1).expand(2, channels, 1, 1)
    zero, one = normalize(probe).double().view(2, channels).cpu()
    std = 1.0 / (one - zero)
    return tuple((-zero * std).tolist()), tuple(std.tolist())


def moe_layers(backbone: nn.Module) -> dict[str, MoELayer]:
    return {name: m for name, m in backbone.named_modules() if isinstance(m, MoELayer)}


@torch.no_grad()
def measure(backbone: nn.Module, augment: ViewAugment, images_uint8: Tensor, pairs: int, batch_size: int = 256) -> RoutingStabilityMeter:
    """Feed ``pairs`` rounds of two views of every image through ``backbone`` and meter every MoE layer."""
    layers = moe_layers(backbone)
    meter = RoutingStabilityMeter(next(iter(layers.values())).num_experts)
    depth = 1 + max(int(name.split(".")[1]) for name in layers) if all(n.startswith("blocks.") for n in layers) else None
    forward = (lambda x: backbone.tokens(x, depth)) if depth is not None and hasattr(backbone, "tokens") else backbone
    for _ in range(pairs):
        for chunk in images_uint8.split(batch_size):
            views = augment(chunk, num_views=2)
            batch = chunk.shape[0]
            match, _ = view_matches(backbone.patch_embed, views.matrices[0], views.matrices[1])
            with record_routing(backbone) as recorded:
                forward(torch.cat(views.images))  # both views in one forward: routing groups are per image
            for name, (routing,) in recorded.items():
                probs = routing.probs.float().view(2, batch, -1, routing.num_experts)
                load = routing.load()
                if layers[name].router.per_token:
                    meter.update(name, probs[0], probs[1], match.partner, match.valid, load)
                else:  # image-level: each image's mean distribution, partnered with itself
                    image = probs.mean(dim=2, keepdim=True)
                    itself = torch.zeros(batch, 1, dtype=torch.long, device=probs.device)
                    meter.update(name, image[0], image[1], itself, torch.ones_like(itself, dtype=torch.bool), load)
    return meter


def augmentation_stability(
    backbone: nn.Module,
    augment_cfg,
    normalize: Callable[[Tensor], Tensor],
    images_uint8: Tensor,
    *,
    pairs: int,
    strengths: list[float],
    seed: int,
) -> StabilityResult:
    """Routing stability of ``backbone``'s MoE blocks under the run's augmentation, per family and over strength.

    Args:
        backbone: a ViT with MoE layers (``patch_embed`` gives the patch centres).
        augment_cfg: the run's ``data.augment`` (AugmentConfig, DictConfig or dict).
        normalize: the run's ``uint8 -> normalised`` map (e.g. ``ViewAugment.normalize``); its mean/std are reused.
        images_uint8: ``[images, channels, size, size]`` uint8 images, on the backbone's device.
        pairs: rounds of two fresh views per image, for each measurement.
        strengths: augmentation strengths of the curve (0 = identity, 1 = the run's).
        seed: seeds the augmentations; the caller's RNG state is restored afterwards.
    """
    layers = moe_layers(backbone)
    if not layers:
        raise ConfigError(
            "the backbone has no MoE layer, so there is no routing to measure; set model.moe_layers or model.stack with a route block."
        )
    if getattr(backbone.patch_embed, "selector", None) is not None:
        raise ConfigError(
            "augmentation stability pairs patches on the grid; evaluate a run with the grid patch embedding (no patch selector)."
        )
    if pairs < 1:
        raise ConfigError(f"pairs={pairs} must be at least 1 round of augmented view pairs.")
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ConfigError(
            f"images must be uint8 [images, channels, size, size], got {images_uint8.dtype} {list(images_uint8.shape)}; pass the dataset's raw images."
        )
    run = as_augment_config(augment_cfg)
    channels, size = images_uint8.shape[1], images_uint8.shape[-1]
    mean, std = normalisation_of(normalize, channels, images_uint8.device)

    def stats(cfg: AugmentConfig) -> dict[str, float]:
        augment = ViewAugment(cfg, channels, size, mean, std).to(images_uint8.device)
        return measure(backbone, augment, images_uint8, pairs).compute()

    metrics: dict[str, float] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    devices = [images_uint8.device] if images_uint8.device.type == "cuda" else []
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            metrics.update(_nest(stats(run), ""))
            for family in FAMILIES:
                cfg, in_run = family_only(run, family)
                metrics[f"family/{family}/in_run"] = float(in_run)
                metrics.update(_nest(stats(cfg), f"family/{family}"))
            for s in sorted(strengths):
                nested = _nest(stats(scale_augment(run, s)), f"strength/{s:g}")
                metrics.update(nested)
                for key, value in nested.items():
                    block, _, metric = key.partition(f"/strength/{s:g}/")
                    if block.startswith("block") and metric in ("routing_agreement", "routing_agreement_chance"):
                        curve = block if metric == "routing_agreement" else f"{block}/chance"
                        curves.setdefault(curve, []).append((float(s), value))
    finally:
        backbone.train(was_training)
    return StabilityResult(metrics, curves)


def _nest(stats: dict[str, float], scope: str) -> dict[str, float]:
    """``block2/routing_js -> block2/{scope}/routing_js``, ``routing_js -> {scope}/routing_js``.

    Usage keys are dropped: expert usage is ``ssroute.eval.analytics``' business, on un-augmented images.
    """
    out = {}
    for key, value in stats.items():
        block, _, metric = key.rpartition("/")
        if metric in ("routing_agreement", "routing_agreement_chance", "routing_js"):
            out["/".join(part for part in (block, scope, metric) if part)] = value
    return out

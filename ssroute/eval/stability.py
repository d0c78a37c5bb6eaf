"""Routing stability under augmentation, by augmentation family and as a curve over strength.

Over ``pairs`` rounds of two independently augmented views of every image, for
every MoE block: top-1 agreement of corresponding patches (partners from the
views' matrices, ``ssroute.data.correspondence``), the mean Jensen-Shannon
divergence of their routing distributions, and the chance agreement of the same
usage (``ssroute.eval.agreement.RoutingAgreementMeter``). Measured
three ways (every forward pairs the two views' executed experts, ``ssroute.eval.agreement``):

- with the run's augmentation: ``block{i}/routing_agreement``, ``/routing_js``,
  ``/routing_agreement_chance``, ``/routing_dropped_pairs``, ``/expert_usage_entropy``,
  ``/dead_experts`` and their means over blocks (plain keys);
- one augmentation family at a time (:data:`FAMILIES`: crop, flip, rotation,
  colour, blur_noise), everything else off: ``block{i}/family/{name}/...``.
  A family the run leaves off is measured at a reference magnitude
  (:data:`REFERENCE`), and ``family/{name}/in_run`` says which;
- every family scaled by a strength ``s`` (:func:`scale_augment`): 0 is the
  identity (a deterministic router agrees with itself: 1.0), 1 the run's
  augmentation, above 1 stronger: ``block{i}/strength/{s}/...``, also as
  ``curves["block{i}"]`` (agreement) and ``curves["block{i}/chance"]``.

Routers of whole images are compared per image, every image its own partner.
With a patch selector each view takes its own patches; a patch's partner is the
nearest patch the other view took that contains the mapped centre.

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
from ssroute.data.correspondence import matches_of
from ssroute.data.views import ViewAugment
from ssroute.errors import ConfigError
from ssroute.eval.agreement import RoutingAgreementMeter
from ssroute.eval.features import evaluating
from ssroute.moe import moe_layers

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


def measure(backbone: nn.Module, augment: ViewAugment, images_uint8: Tensor, pairs: int, batch_size: int = 256) -> RoutingAgreementMeter:
    """Feed ``pairs`` rounds of two views of every image through ``backbone`` (as it is: the caller sets the mode) and meter every MoE block."""
    layers = moe_layers(backbone)
    meter = RoutingAgreementMeter(next(iter(layers.values())).num_experts)
    end = max(layers) + 1 if hasattr(backbone, "blocks") and len(backbone.blocks) else None  # no block after the last routed one is needed
    for _ in range(pairs):
        for chunk in images_uint8.split(batch_size):
            views = augment(chunk, num_views=2)
            auxes = [backbone(view, end=end)[1] for view in views.images]  # one forward per view, as in training: groups never mix views
            match, _ = matches_of(views, [a.patches for a in auxes], backbone.patch_embed)
            for block in auxes[0].routings:
                meter.update(block, auxes[0].routings[block], auxes[1].routings[block], match.partner, match.valid)
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
    families: bool = True,
) -> StabilityResult:
    """Routing stability of ``backbone``'s MoE blocks under the run's augmentation, per family and over strength.

    Args:
        backbone: a ViT with MoE layers (``patch_embed`` gives the patch geometry; any patch selector).
        augment_cfg: the run's ``data.augment`` (AugmentConfig, DictConfig or dict).
        normalize: the run's ``uint8 -> normalised`` map (e.g. ``ViewAugment.normalize``); its mean/std are reused.
        images_uint8: ``[images, channels, size, size]`` uint8 images, on the backbone's device.
        pairs: rounds of two fresh views per image, for each measurement.
        strengths: augmentation strengths of the curve (0 = identity, 1 = the run's).
        seed: seeds the augmentations; the caller's RNG state is restored afterwards.
        families: also measure one augmentation family at a time (False: the run's augmentation and the strengths only).
    """
    if not moe_layers(backbone):
        raise ConfigError(
            "the backbone has no MoE layer, so there is no routing to measure; set model.moe_layers or model.stack with a route block."
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
    with evaluating(backbone, seed=seed):
        metrics.update(_nest(stats(run), ""))
        for family in FAMILIES if families else ():
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
    return StabilityResult(metrics, curves)


def _nest(stats: dict[str, float], scope: str) -> dict[str, float]:
    """``block2/routing_js -> block2/{scope}/routing_js``, ``routing_js -> {scope}/routing_js``.

    Expert usage (``expert_usage_entropy``, ``dead_experts``) is kept for the run's own augmentation (``scope=""``) only.
    """
    kept = ("routing_agreement", "routing_agreement_chance", "routing_dropped_pairs", "routing_js")
    if not scope:
        kept += ("expert_usage_entropy", "dead_experts")
    out = {}
    for key, value in stats.items():
        block, _, metric = key.rpartition("/")
        if metric in kept:
            out["/".join(part for part in (block, scope, metric) if part)] = value
    return out

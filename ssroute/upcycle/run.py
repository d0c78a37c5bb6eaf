"""Upcycling whole checkpoints: a dense run becomes a routed run that ``python -m finetune`` accepts.

Every chosen block's FFN is split into experts (:mod:`ssroute.upcycle.split`) behind an
``mlp_selection`` router, trained on the FFN inputs of training images (or random selection).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ssroute.checkpoint import load_checkpoint, load_pretrained
from ssroute.data import build_data
from ssroute.data.views import normalize
from ssroute.errors import ConfigError
from ssroute.io import save_atomic
from ssroute.models import build_backbone
from ssroute.upcycle.split import check_divisible, experts_from_ffn, neuron_groups, train_selection_router


def backbone_config(config: dict):
    """The run config as OmegaConf, with ``model`` keys added since the checkpoint was written at their defaults."""
    from omegaconf import OmegaConf

    from ssroute.config import ModelConfig

    model = OmegaConf.to_container(OmegaConf.structured(ModelConfig))
    model.update(config["model"])
    return OmegaConf.create({**config, "model": model})


def _normalized(images: Tensor, data) -> Tensor:
    """The dataset's images as the model sees them (``ssroute.data.views.normalize`` with its statistics)."""
    return normalize(images, torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1))


@torch.no_grad()
def ffn_inputs(backbone: nn.Module, images: Tensor, layers: list[int], batch: int = 256) -> dict[int, Tensor]:
    """``{layer: [images * tokens, dim]}`` inputs of the chosen blocks' FFNs (after ``norm2``)."""
    captured: dict[int, list[Tensor]] = {i: [] for i in layers}
    hooks = [
        backbone.blocks[i].ffn.register_forward_hook(lambda m, args, out, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i in layers
    ]
    try:
        backbone.eval()
        for start in range(0, images.shape[0], batch):
            backbone(images[start : start + batch])
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.cat(parts) for i, parts in captured.items()}


def upcycle_checkpoint(
    checkpoint: str,
    num_experts: int = 8,
    layers: list[int] | None = None,
    selection: str = "mlp",
    k: int | None = None,
    steps: int = 300,
    images: int = 2048,
    seed: int = 0,
) -> dict:
    """A routed checkpoint dict from a dense one (``python -m pretrain`` or ``python -m finetune`` run).

    Every chosen block's FFN (default: all) becomes ``num_experts`` upcycled
    ``mlp`` experts behind an ``mlp_selection`` router (``selection="mlp"``: trained
    on the FFN inputs of ``images`` training images for ``steps`` steps;
    ``"random"``: the baseline) with ``k`` experts per token (default ``E // 2``).
    Keys other than the backbone's (a fine-tuned head) are kept.
    """
    if selection not in ("mlp", "random"):
        raise ConfigError(f"selection={selection!r} is not valid; choose mlp or random.")
    config, dense_state = load_pretrained(checkpoint)
    model = config["model"]
    hidden = int(model["mlp_ratio"] * model["dim"])
    check_divisible(hidden, num_experts)
    routed_already, over_depth = set(model.get("moe_layers") or []), set(model.get("depth_layers") or [])
    layers = [i for i in range(model["depth"]) if i not in over_depth] if layers is None else sorted(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < model["depth"] or i in routed_already | over_depth]
    if bad:
        raise ConfigError(
            f"layers={bad} are not dense FFN blocks of this checkpoint (depth {model['depth']}, MoE blocks {sorted(routed_already)}, "
            f"blocks routed over depth {sorted(over_depth)}); choose dense block indices."
        )
    k = max(1, num_experts // 2) if k is None else int(k)
    data = build_data(OmegaConf.create(config["data"]), seed)
    dense = build_backbone(backbone_config(config), data.image_size, data.channels)
    dense.load_state_dict(dense_state)

    new_config = OmegaConf.to_container(backbone_config(config), resolve=True)
    new_config["model"].update(
        moe_layers=sorted(routed_already | set(layers)), num_experts=num_experts, expert_hidden=hidden // num_experts
    )
    new_config["router"] = {
        "name": "mlp_selection",
        "k": k,
        "hidden": None,
        "random": selection == "random",
        "seed": seed,
        "straight_through": True,
    }
    new_config["experts"] = {"name": "mlp", "depth": 2, "activation": model["activation"], "out_bias": "shared"}
    routed = build_backbone(backbone_config(new_config), data.image_size, data.channels)
    missing, unexpected = routed.load_state_dict(dense_state, strict=False)
    assert all(".ffn." in key for key in [*missing, *unexpected]), (missing, unexpected)

    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.train), generator=generator)[:images]
    inputs = ffn_inputs(dense, _normalized(data.train.images[pick], data), layers) if selection == "mlp" else {}
    report: dict[str, dict[str, float]] = {}
    for i in layers:
        ffn, moe = dense.blocks[i].ffn, routed.blocks[i].ffn
        groups, centroids = neuron_groups(ffn, num_experts, seed)
        bank, _ = experts_from_ffn(ffn, num_experts, groups=groups)
        moe.experts.load_state_dict(bank.state_dict())
        moe.router.init_from_centroids(centroids[:, :-1], centroids[:, -1])
        if selection == "mlp":
            report[f"block{i}"] = train_selection_router(moe.router, ffn, groups, inputs[i], steps=steps, seed=seed)

    source_file, source = load_checkpoint(checkpoint)
    state = {key: value for key, value in source["state_dict"].items() if not key.startswith("backbone.")}
    state.update({f"backbone.{key}": value for key, value in routed.state_dict().items()})
    info = {"source": str(source_file), "num_experts": num_experts, "layers": layers, "selection": selection, "k": k,
            "steps": steps, "images": int(pick.numel()), "router_fit": report}  # fmt: skip
    inputs = {"inputs": source["hyper_parameters"]["inputs"]} if "inputs" in source["hyper_parameters"] else {}
    return {"hyper_parameters": {"config": new_config, **inputs}, "state_dict": state, "upcycle": info}


def save_upcycled(checkpoint: dict, run_dir) -> Path:
    """Write ``run_dir/checkpoints/last.ckpt`` (atomically), ``config.yaml`` and ``upcycle.json``; returns the folder."""
    run_dir = Path(run_dir)
    save_atomic(checkpoint, run_dir / "checkpoints" / "last.ckpt")
    OmegaConf.save(OmegaConf.create(checkpoint["hyper_parameters"]["config"]), run_dir / "config.yaml")
    (run_dir / "upcycle.json").write_text(json.dumps(checkpoint["upcycle"], indent=2) + "\n")
    return run_dir

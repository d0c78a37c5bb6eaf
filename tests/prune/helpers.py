"""Small models for the pruning tests: dense, token-choice MoE and upcycled (mlp_selection, shared bias) ViTs."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from ssroute.config import PretrainConfig
from ssroute.models import build_backbone
from ssroute.prune.masks import sort_expert_units
from ssroute.prune.surgery import prune_state, pruned_config


def build(router: str | None, dim: int = 32, depth: int = 3, activation: str = "gelu"):
    """(ViT in eval mode, its run config) on 8x8 one-channel images; ``router`` None = dense."""
    cfg = OmegaConf.structured(PretrainConfig)
    cfg.model.dim, cfg.model.depth, cfg.model.patch_size, cfg.model.activation = dim, depth, 2, activation
    if router is not None:
        cfg.model.moe_layers, cfg.model.num_experts = [1, 2], 4
        cfg.router = (
            {"name": "token_choice", "k": 2, "capacity_factor": None} if router == "token_choice" else {"name": "mlp_selection", "k": 2}
        )
        if router == "mlp_selection":
            cfg.experts = {"name": "mlp", "out_bias": "shared"}
            cfg.model.expert_hidden = 16
    vit = build_backbone(cfg, 8, 1).eval()
    with torch.no_grad():
        for name, param in vit.named_parameters():
            if name.endswith("b_out") or name.endswith("proj.bias") or name.endswith("fc2.bias"):
                param.normal_()  # biases the removal must scale or drop exactly
    sort_expert_units(vit)
    return vit, cfg


def prune_and_rebuild(vit, cfg, masks, z):
    """The physically pruned ViT (built from its new config) for gates ``z``."""
    state, update = prune_state(vit, masks.shape, z)
    new = OmegaConf.merge(cfg, pruned_config(OmegaConf.to_container(cfg), update))
    small = build_backbone(new, 8, 1).eval()
    small.load_state_dict(state)
    return small

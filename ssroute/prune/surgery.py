"""Physical removal: the masked ViT becomes a smaller ViT of the same classes (CoFI's ``prune_model_with_z``).

Given the deterministic gates (:meth:`~ssroute.prune.masks.MaskSet.deterministic`),
:func:`prune_state` slices every weight to the kept structures and folds the
kept gates' values into the weights that follow them:

- heads: the kept heads' rows of ``qkv`` and columns of ``proj``; a head's gate
  and the layer's ``mha`` gate scale its ``proj`` columns (``mha`` also the bias);
- hidden units / expert units: rows of ``fc1`` (``w_in`` columns), columns of
  ``fc2`` (``w_out`` rows) scaled by the unit and ``ffn`` gates;
- experts: the kept experts' weights and the router's rows for them;
- hidden dimension: the kept coordinates of every matrix, norm and bias on the
  residual stream; the gate's values scale the writers (``proj``, ``fc2``,
  ``w_out``) and the norms; the position code keeps the same coordinates
  (``model.shape.position_dims``).

The new model's config (:func:`pruned_config`) records the per-block
widths in ``model.shape`` (:class:`~ssroute.config.ShapeConfig`), so
``build_backbone`` builds it and ``python -m finetune`` trains it. The result
equals the masked model with deterministic gates to float precision
(``tests/prune/test_surgery.py``); with a capacity-limited router the pruned
layer's buffers are sized for its own experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ssroute.prune.shapes import ModelShape


def _kept(z: dict[str, Tensor], name: str, size: int) -> tuple[Tensor, Tensor]:
    """(indices of the kept gates, their values) of gate ``name`` (all, value 1, when it is not gated)."""
    if name not in z:
        return torch.arange(size), torch.ones(size)
    values = z[name].detach().float().cpu()
    index = values.nonzero().squeeze(1)
    return index, values[index]


@torch.no_grad()
def prune_state(backbone: nn.Module, shape: ModelShape, z: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict of the pruned backbone, its ``model.shape`` and ``model.dim``) for deterministic gates ``z``."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    dims, zh = _kept(z, "hidden", shape.dim)
    out: dict[str, Tensor] = {}
    norm = lambda prefix: out.update(
        {f"{prefix}.weight": state[f"{prefix}.weight"][dims] * zh, f"{prefix}.bias": state[f"{prefix}.bias"][dims] * zh}
    )  # noqa: E731
    out.update({k: v for k, v in state.items() if k.startswith("patch_embed.")})  # a conv stem (never narrowed) as it is
    if "hidden" in z:  # the patch stem's rows of the kept coordinates
        out["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][dims]
        out["patch_embed.proj.bias"] = state["patch_embed.proj.bias"][dims]
    norm("norm")
    heads_kept, widths, experts_kept = [], [], []
    for i, b in enumerate(shape.blocks):
        p = f"blocks.{i}"
        norm(f"{p}.norm1")
        norm(f"{p}.norm2")
        mha = float(z["mha"][i]) if "mha" in z else 1.0
        heads, zhead = _kept(z, f"heads_{i}", b.heads)
        if mha == 0.0:
            heads, zhead = heads[:0], zhead[:0]
        hd = b.head_dim
        qkv_w = state[f"{p}.attn.qkv.weight"].view(3, b.heads, hd, shape.dim)[:, heads][..., dims]
        out[f"{p}.attn.qkv.weight"] = qkv_w.reshape(3 * len(heads) * hd, len(dims))
        out[f"{p}.attn.qkv.bias"] = state[f"{p}.attn.qkv.bias"].view(3, b.heads, hd)[:, heads].reshape(-1)
        proj = state[f"{p}.attn.proj.weight"].view(shape.dim, b.heads, hd)[dims][:, heads] * zhead[None, :, None] * mha * zh[:, None, None]
        out[f"{p}.attn.proj.weight"] = proj.reshape(len(dims), len(heads) * hd)
        out[f"{p}.attn.proj.bias"] = state[f"{p}.attn.proj.bias"][dims] * mha * zh
        heads_kept.append(len(heads))
        if b.kind == "other":
            out.update({k: v for k, v in state.items() if k.startswith(f"{p}.ffn.")})
            widths.append(0)
            experts_kept.append(b.experts)
            continue
        ffn = float(z["ffn"][i]) if "ffn" in z else 1.0
        units, zunit = _kept(z, f"units_{i}", b.width)
        if ffn == 0.0:
            units, zunit = units[:0], zunit[:0]
        widths.append(len(units))
        if b.kind == "dense":
            f = f"{p}.ffn"
            out[f"{f}.fc1.weight"] = state[f"{f}.fc1.weight"][units][:, dims]
            out[f"{f}.fc1.bias"] = state[f"{f}.fc1.bias"][units]
            out[f"{f}.fc2.weight"] = state[f"{f}.fc2.weight"][dims][:, units] * zunit[None, :] * ffn * zh[:, None]
            out[f"{f}.fc2.bias"] = state[f"{f}.fc2.bias"][dims] * ffn * zh
            experts_kept.append(0)
            continue
        experts, _ = _kept(z, f"experts_{i}", b.experts)  # binary gates: nothing to fold
        experts_kept.append(len(experts))
        e = f"{p}.ffn.experts"
        out[f"{e}.w_in"] = state[f"{e}.w_in"][experts][:, dims][:, :, units]
        out[f"{e}.b_in"] = state[f"{e}.b_in"][experts][:, units]
        out[f"{e}.w_out"] = state[f"{e}.w_out"][experts][:, units][:, :, dims] * zunit[None, :, None] * ffn * zh[None, None, :]
        b_out = state[f"{e}.b_out"]
        out[f"{e}.b_out"] = (b_out[dims] if b.shared_bias else b_out[experts][:, dims]) * ffn * zh
        out.update(_router_state(state, f"{p}.ffn.router", b.router, experts, dims))
    config = {
        "router_hidden": max((b.router_hidden for b in shape.blocks), default=0),
        "dim": len(dims),
        "shape": {
            "head_dim": shape.blocks[0].head_dim if shape.blocks else None,
            "heads": heads_kept,
            "ffn_hidden": widths,
            "experts": experts_kept,
            "position_dims": _position_dims(backbone, dims),
            "position_width": backbone.patch_embed.position_width,
        },
    }
    return out, config


def _router_state(state: dict[str, Tensor], prefix: str, name: str | None, experts: Tensor, dims: Tensor) -> dict[str, Tensor]:
    mine = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    if name == "token_choice":
        mine[f"{prefix}.gate.weight"] = mine[f"{prefix}.gate.weight"][experts][:, dims]
    elif name == "mlp_selection":
        mine[f"{prefix}.mlp.0.weight"] = mine[f"{prefix}.mlp.0.weight"][:, dims]
        mine[f"{prefix}.mlp.2.weight"] = mine[f"{prefix}.mlp.2.weight"][experts]
        mine[f"{prefix}.mlp.2.bias"] = mine[f"{prefix}.mlp.2.bias"][experts]
    return mine


def _position_dims(backbone: nn.Module, dims: Tensor) -> list[int]:
    own = backbone.patch_embed.position_dims
    kept = dims if own is None else own[dims]
    if own is None and len(dims) == backbone.dim:
        return []  # nothing removed: the default code
    return [int(d) for d in kept]


@torch.no_grad()
def prune_head(head: nn.Module, z: dict[str, Tensor], dim: int) -> dict[str, Tensor]:
    """The state of a ``BatchNorm1d -> Linear`` classification head on the kept hidden coordinates."""
    dims, _ = _kept(z, "hidden", dim)
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            state[key] = value[dims]
        elif key.endswith("weight") and value.ndim == 2:
            state[key] = value[:, dims]
    return state


def pruned_config(config: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """The source's run config with the pruned widths (``model.dim``, ``model.shape``); an ``mlp_selection``
    router's hidden width is pinned, since its default (``2 * experts``) would follow the pruned expert count."""
    out = {**config, "model": {**config["model"], "dim": update["dim"], "shape": update["shape"]}}
    if update.get("router_hidden") and (config.get("router") or {}).get("name") == "mlp_selection":
        out["router"] = {**config["router"], "hidden": update["router_hidden"]}
    return out

"""Parameter and FLOP accounting for models with or without MoE layers.

An MoE model has more parameters than it uses per token. For any
``nn.Module`` this reports:

- ``params_total``: every parameter; ``params_active``: those one token uses
  (everything outside MoE layers, plus per MoE layer the router and the
  experts one token activates: ``k`` of them for top-k, the measured mean for
  dynamic k, all of them for soft MoE whose slots mix every token);
- ``flops_per_token``: ``2 x`` multiply-adds per token of linear and
  convolution layers (a convolution is counted once per token, as in a patch
  embedding), attention score and value products (``4 * tokens * dim``), and
  per MoE layer its router plus ``rows_per_token`` expert evaluations
  (``E * slots / tokens`` for soft MoE). Norms and activations are ignored;
- ``expert_param_share`` / ``expert_flop_share``: the part of the totals
  spent in experts (0 for a dense model);
- per expert type (one, or several for ``experts=mixed``)
  ``experts/<type>/params`` and ``experts/<type>/flops_per_token``, summed over
  the MoE layers; they add up to ``params_experts`` and ``flops_experts_per_token``.

A mixture of attention heads (``ssroute.moe.attention_heads``) counts the same
way, its heads being the experts: ``k`` heads' query and output projections
are active per token, the shared key/value projection always.

>>> from ssroute.layers.mlp import FeedForward
>>> model_accounting(FeedForward(8, 32), tokens_per_image=4)["flops_per_token"]
1024.0
"""

from __future__ import annotations

from torch import nn

from ssroute.layers.attention import Attention
from ssroute.moe.layer import MoELayer


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """The MoE layers of ``model`` by the index of the block they sit in (``blocks.<i>.ffn``; order of appearance otherwise)."""
    return _by_block(model, (MoELayer,))


def routed_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Every routed layer with its own ``accounting``: MoE layers and mixtures of attention heads, by block index."""
    from ssroute.moe.attention_heads import MixtureOfAttentionHeads

    return _by_block(model, (MoELayer, MixtureOfAttentionHeads))


def _by_block(model: nn.Module, kinds: tuple[type, ...]) -> dict[int, nn.Module]:
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            parts = name.split(".")
            index = (
                int(parts[parts.index("blocks") + 1]) if "blocks" in parts and parts[parts.index("blocks") + 1].isdigit() else len(found)
            )
            found[index] = module
    return found


def _flops(module: nn.Module, tokens_per_image: int, moe: dict[nn.Module, dict[str, float]]) -> float:
    if module in moe:
        return moe[module]["flops_per_token"]
    flops = 0.0
    if isinstance(module, nn.Linear):
        flops += 2.0 * module.in_features * module.out_features
    elif isinstance(module, nn.modules.conv._ConvNd):
        flops += 2.0 * module.weight.numel()
    elif isinstance(module, Attention):
        flops += 4.0 * tokens_per_image * module.proj.in_features
    elif isinstance(module, nn.MultiheadAttention):
        flops += 2.0 * 3 * module.embed_dim * module.embed_dim + 4.0 * tokens_per_image * module.embed_dim
    return flops + sum(_flops(child, tokens_per_image, moe) for child in module.children())


def model_accounting(model: nn.Module, tokens_per_image: int, measured_rows: dict[int, float] | None = None) -> dict[str, float]:
    """Total/active parameters, FLOPs per token and the expert shares of ``model``.

    ``measured_rows``: expert rows per token of the MoE layers seen in a real forward, by block index
    (``ForwardAux.rows_per_token()``), for routers whose k depends on the data (dynamic k).
    """
    measured = measured_rows or {}
    moe = {m: m.accounting(tokens_per_image, measured.get(i)) for i, m in routed_layers(model).items()}
    params_total = float(sum(p.numel() for p in model.parameters()))
    params_inactive = sum(a["params_total"] - a["params_active"] for a in moe.values())
    params_experts = sum(a["params_experts"] for a in moe.values())
    flops = _flops(model, tokens_per_image, moe)
    flops_experts = sum(a["flops_experts_per_token"] for a in moe.values())
    per_type: dict[str, float] = {}  # experts/<type>/params and experts/<type>/flops_per_token, summed over layers
    for layer in moe.values():
        for key, value in layer.items():
            if key.startswith("experts/"):
                per_type[key] = per_type.get(key, 0.0) + value
    return {
        "params_total": params_total,
        "params_active": params_total - params_inactive,
        "params_experts": float(params_experts),
        "flops_per_token": flops,
        "flops_experts_per_token": float(flops_experts),
        "expert_param_share": params_experts / params_total if params_total else 0.0,
        "expert_flop_share": flops_experts / flops if flops else 0.0,
        "moe_layers": float(sum(isinstance(m, MoELayer) for m in moe)),
        "attention_heads_layers": float(sum(not isinstance(m, MoELayer) for m in moe)),
        **per_type,
    }

"""CoFI's masks on a ViT, applied from the outside with forward hooks (Xia et al. 2022, arXiv 2204.00408).

:class:`MaskSet` holds one :class:`~ssroute.prune.hard_concrete.HardConcrete`
block per structure (:mod:`ssroute.prune.shapes`): ``mha`` ``[blocks]``,
``ffn`` ``[blocks]``, ``hidden`` ``[dim]`` and per block ``heads_<i>``
``[heads]``, ``units_<i>`` ``[hidden units]`` and ``experts_<i>`` ``[experts]``.
:meth:`MaskSet.draw` samples the gates once per training step (deterministic
gates in eval mode); the hooks :meth:`MaskSet.attach` registers read them:

- heads: the attention's output projection input, per head (``proj`` pre-hook);
- mha / ffn / hidden: the attention's and the FFN's output (including its
  bias), times the layer gate and the hidden-dimension gate;
- units: the FFN activation's output (the dense FFN's, or each expert's);
- experts: ``log z`` added to the router's logits (``Router.expert_logit_offset``),
  so a removed expert is never chosen and a kept one's probability scales by ``z``;
- hidden: every LayerNorm normalises over the kept coordinates only and scales
  by ``z`` (CoFI's ``CoFiLayerNorm``); a classification head reads the kept ones.

The residual stream itself is not masked: every reader of it (the norms)
ignores the removed coordinates, so they are dead, and the writers' outputs
carry the ``z`` factors that :mod:`ssroute.prune.surgery` folds into weights.

>>> import torch
>>> from ssroute.models.vit import ViT
>>> vit = ViT(image_size=8, channels=1, dim=16, depth=2, heads=4, patch_size=2).eval()
>>> masks = MaskSet(vit, ["heads", "units", "hidden"]).eval()
>>> x = torch.randn(3, 1, 8, 8)
>>> with masks.applied(vit):
...     masked = vit(x)[0]
>>> masked.shape, bool((masked - vit(x)[0]).abs().max() > 0)
(torch.Size([3, 16]), True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ssroute.moe import MoELayer
from ssroute.prune.hard_concrete import HardConcrete
from ssroute.prune.shapes import ModelShape, choose_structures, describe

TINY = 1e-12  # log(TINY) is the logit offset of a removed expert: its probability is ~1e-12 of a kept one's


def masked_layer_norm(x: Tensor, gate: Tensor, norm: nn.LayerNorm) -> Tensor:
    """LayerNorm of ``x [..., dim]`` over the coordinates where ``gate != 0``, times ``gate`` (0 elsewhere)."""
    keep = (gate != 0).to(x.dtype)
    count = keep.sum().clamp_min(1.0)
    mean = (x * keep).sum(-1, keepdim=True) / count
    var = ((x - mean) ** 2 * keep).sum(-1, keepdim=True) / count
    y = (x - mean) * torch.rsqrt(var + norm.eps)
    return (y * norm.weight + norm.bias) * gate


class MaskSet(nn.Module):
    """The hard-concrete gates of one ViT's structures.

    Args:
        backbone: the ViT the gates are for (sizes are read from it).
        structures: which of ``mha, heads, ffn, units, experts, hidden`` to gate; None = every supported one.
        temperature: the gates' ``l0_temperature`` (lower = sparser).
        droprate_init: initial drop probability of every gate.
    """

    def __init__(
        self, backbone: nn.Module, structures: list[str] | None = None, temperature: float = 2.0 / 3.0, droprate_init: float = 0.5
    ) -> None:
        super().__init__()
        self.shape: ModelShape = describe(backbone)
        self.structures = choose_structures(self.shape, structures)
        gates: dict[str, HardConcrete] = {}
        depth = len(self.shape.blocks)

        def add(name: str, size: int, binary: bool = False) -> None:
            if size > 0:
                gates[name] = HardConcrete(size, temperature=temperature, droprate_init=droprate_init, binary=binary)

        if "mha" in self.structures:
            add("mha", depth)
        if "ffn" in self.structures:
            add("ffn", depth)
        if "hidden" in self.structures:
            add("hidden", self.shape.dim)
        for i, b in enumerate(self.shape.blocks):
            if "heads" in self.structures:
                add(f"heads_{i}", b.heads)
            if "units" in self.structures and b.kind != "other":
                add(f"units_{i}", b.width)
            if "experts" in self.structures and b.maskable_experts:
                add(f"experts_{i}", b.experts, binary=True)  # the bias-free gate has nowhere to fold a scale
        self.gates = nn.ModuleDict(gates)
        self.min_experts = {
            i: int(getattr(block.ffn.router, "k", 1)) for i, block in enumerate(backbone.blocks) if isinstance(block.ffn, MoELayer)
        }
        self.z: dict[str, Tensor] = {}
        self._routers: dict[int, nn.Module] = {}  # set by attach: the routers whose experts are gated
        self._handles: list = []  # the hooks attach registered

    def draw(self) -> dict[str, Tensor]:
        """Sample every gate (training) or take the deterministic gates (eval); the hooks read these until the next draw."""
        self.z = {name: gate() for name, gate in self.gates.items()}
        if not self.training:
            for name in self.z:
                if name.startswith("experts_"):  # keep at least the router's k experts, so top-k never reaches a removed one
                    self.z[name] = _at_least(self.z[name], self.gates[name].log_alpha.detach(), self.min_experts[int(name.split("_")[1])])
        for i, router in self._routers.items():  # route with the expert gates: log z on the logits
            router.expert_logit_offset = torch.log(self.z[f"experts_{i}"].clamp_min(TINY))
        return self.z

    def keep_probabilities(self) -> dict[str, Tensor]:
        """``P(z != 0)`` of every gate (the expected sparsity's input, differentiable)."""
        return {name: gate.prob_nonzero() for name, gate in self.gates.items()}

    def deterministic(self) -> dict[str, Tensor]:
        """The evaluation gates (what physical removal keeps), without changing the mode."""
        was = self.training
        self.eval()
        try:
            return {name: z.detach().clone() for name, z in self.draw().items()}
        finally:
            self.train(was)

    def l0_logs(self) -> dict[str, float]:
        return {name: float(gate.l0()) for name, gate in self.gates.items()}

    # --- hooks
    def _gate(self, name: str, index: int | None = None) -> Tensor | None:
        z = self.z.get(name)
        return None if z is None or index is None else z[index]

    def _scale(self, out: Tensor, *factors: Tensor | None) -> Tensor:
        for factor in factors:
            if factor is not None:
                out = out * factor.to(out.dtype)
        return out

    def attach(self, backbone: nn.Module, head: nn.Module | None = None) -> None:
        """Register the hooks on ``backbone`` (and the classification ``head``'s linear layer); :meth:`detach_hooks` removes them."""
        handles = self._handles
        hook = lambda module, fn: handles.append(module.register_forward_hook(fn))  # noqa: E731
        pre = lambda module, fn: handles.append(module.register_forward_pre_hook(fn))  # noqa: E731
        norm_hook = lambda m, args, out: out if "hidden" not in self.z else masked_layer_norm(args[0], self.z["hidden"], m)  # noqa: E731
        for i, block in enumerate(backbone.blocks):
            hook(block.norm1, norm_hook)
            hook(block.norm2, norm_hook)
            head_dim = block.attn.head_dim
            pre(block.attn.proj, lambda m, args, i=i, hd=head_dim: self._heads_input(args, i, hd))
            hook(block.attn.proj, lambda m, args, out, i=i: self._scale(out, self._gate("mha", i), self.z.get("hidden")))
            ffn = block.ffn
            if isinstance(ffn, MoELayer) and self.shape.blocks[i].kind == "moe":
                act, writer = ffn.experts.act, ffn.experts
            elif self.shape.blocks[i].kind == "dense":
                act, writer = ffn.act, ffn.fc2
            else:
                continue
            hook(act, lambda m, args, out, i=i: self._scale(out, self.z.get(f"units_{i}")))
            hook(writer, lambda m, args, out, i=i: self._scale(out, self._gate("ffn", i), self.z.get("hidden")))
        hook(backbone.norm, norm_hook)
        if head is not None:
            pre(head, lambda m, args: None if "hidden" not in self.z else (args[0] * (self.z["hidden"] != 0).to(args[0].dtype),))
        self._routers = {i: block.ffn.router for i, block in enumerate(backbone.blocks) if f"experts_{i}" in self.gates}

    def _heads_input(self, args: tuple, block: int, head_dim: int):
        z = self.z.get(f"heads_{block}")
        if z is None:
            return None
        return (args[0] * z.repeat_interleave(head_dim).to(args[0].dtype),)

    @contextmanager
    def applied(self, backbone: nn.Module, head: nn.Module | None = None) -> Iterator[MaskSet]:
        """Within the block, ``backbone`` (and ``head``) run masked; each forward should follow a :meth:`draw`
        (one is taken on entry)."""
        self.attach(backbone, head)
        self.draw()
        try:
            yield self
        finally:
            self.detach_hooks()

    def detach_hooks(self) -> None:
        """Remove the hooks :meth:`attach` registered and the routers' expert offsets."""
        for handle in self._handles:
            handle.remove()
        for router in self._routers.values():
            router.expert_logit_offset = None
        self._handles, self._routers = [], {}


def _at_least(z: Tensor, log_alpha: Tensor, k: int) -> Tensor:
    if int((z != 0).sum()) >= k:
        return z
    top = log_alpha.topk(k).indices
    return z.index_fill(0, top, 1.0)


def sort_expert_units(backbone: nn.Module) -> None:
    """Order each two-layer mlp expert's hidden units by ``|w_in column| * |w_out row|``, largest first (function-preserving),
    so one mask per unit rank removes every expert's weakest units together."""
    with torch.no_grad():
        for block in backbone.blocks:
            bank = getattr(block.ffn, "experts", None)
            if not isinstance(block.ffn, MoELayer) or getattr(bank, "depth", 0) != 2 or not hasattr(bank, "w_in"):
                continue
            importance = bank.w_in.norm(dim=1) * bank.w_out.norm(dim=2)  # [experts, hidden]
            order = importance.argsort(dim=1, descending=True)
            bank.w_in.copy_(bank.w_in.gather(2, order[:, None, :].expand_as(bank.w_in)))
            bank.b_in.copy_(bank.b_in.gather(1, order))
            bank.w_out.copy_(bank.w_out.gather(1, order[:, :, None].expand_as(bank.w_out)))

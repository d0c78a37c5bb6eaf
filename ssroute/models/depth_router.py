"""Routing over depth: at each step a router picks which block of a shared pool to apply, identity blocks included.

The notes' "larger scale routing — simple images can be sent to smaller
continuations of the architecture", and their router that chooses the next layer
from a pool holding identity layers, with adaptive computation time. A pool of
``P`` transformer blocks and ``I`` identity blocks is shared by up to ``S``
steps. At step ``s`` a linear depth router reads the image's pooled state
(LayerNorm of the token mean) plus a learned bias per step (the notes: "tell the
router where we are") and picks one of the ``P + I`` choices per image: top-1,
sampled by Gumbel-max while training. Images are grouped by choice so each block
runs once per step on its images (sort, gather, scatter); identity costs nothing.
The chosen block enters through a straight-through gate,
``y = block(x) + (p - sg(p)) * (block(x) - x)``: the forward value is exactly
``block(x)`` and the router gets the MoE gradient through ``p``. The step bias
starts with ``order_prior`` on block ``s`` at step ``s``, so an untrained stack
is close to the dense ViT of depth ``P``.

Adaptive computation time (Graves 2016, arXiv 1603.08983), optional: after
step ``s`` a halting unit reads the pooled state and gives ``h_s``; an image
halts at the first ``n`` with ``h_1 + ... + h_n >= 1 - halt_epsilon`` (or at
``S``; with ``stop_on_identity`` also when it picks an identity) and is not
computed any more. Its output is ``sum_s a_s x_s`` with ``a_s = h_s`` before
``n`` and the remainder ``R = 1 - h_1 - ... - h_{n-1}`` at ``n``. The ponder cost
``ponder_weight * mean(n + R) / S`` is returned in the forward's
:class:`DepthTrace` (``ponder_loss``), which the backbone hands up as the
``depth_ponder`` auxiliary loss.

Per token (``per_token=True``): at every step each token reads its own state
(the LayerNorm of the token) and picks its own block; the tokens that picked a
block are grouped so each block runs once per step, with attention defined in
:mod:`ssroute.models.depth_tokens` (queries: the block's tokens; keys and
values: every token of the image at the start of the step). ACT halting and
``stop_on_identity`` are per image and are refused with it.

The router (:class:`~ssroute.models.depth_controller.DepthController`) is linear
or recurrent (``kind=gru|lstm``: a memory carried across the steps of each
image, or of each token), and is told the step by a learned bias
(``step_input=embedding``), a scalar input, or not at all.

Shapes: ``tokens [batch, tokens, dim] -> [batch, tokens, dim]``; choices ``[batch, steps]``
(``[batch, tokens, steps]`` per token).

>>> import torch
>>> stack = DepthRoutedStack(dim=16, heads=2, pool_blocks=2, identity_blocks=1, max_steps=3).eval()
>>> x = torch.randn(4, 5, 16)
>>> y, trace = stack(x)
>>> y.shape, tuple(trace.picks.shape)
(torch.Size([4, 5, 16]), (4, 3))
>>> torch.equal(stack(x, choices=torch.full((4, 3), 2))[0], x)  # choice 2 is the identity: input unchanged
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.layers.block import TransformerBlock, init_weights
from ssroute.layers.mlp import FeedForward
from ssroute.models.depth_controller import DepthController
from ssroute.models.depth_tokens import block_on_tokens


@dataclass
class DepthTrace:
    """What one forward over depth decided (per token: one path per token, ``[batch, tokens, ...]``)."""

    picks: Tensor  # [batch, steps] choice per step, -1 once halted ([batch, tokens, steps] per token)
    halted_at: Tensor  # [batch] steps taken ([batch, tokens] per token)
    ponder: Tensor | None  # mean ponder cost n + R (ACT only), detached
    ponder_loss: Tensor | None  # ponder_weight * mean(n + R) / max_steps with its gradient (ACT only)


def act_step(total: Tensor, h: Tensor, threshold: float, force: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One ACT step: (cumulative halting ``[B]``, this step's ``h [B]``, ``1 - epsilon``, forced halts ``[B]``) -> (new total, halts, weight).

    The weight of this step's state is ``h`` while running and the remainder ``1 - total`` at the halting step.

    >>> h = torch.tensor([[0.3, 0.3, 0.5, 0.2]])
    >>> total, weights = torch.zeros(1), []
    >>> for s in range(4):
    ...     total, halts, w = act_step(total, h[:, s], 0.99, torch.tensor([s == 3]))
    ...     weights.append(round(float(w), 4))
    ...     if halts: break
    >>> weights
    [0.3, 0.3, 0.4]
    """
    new_total = total + h
    halts = force | (new_total >= threshold)
    return new_total, halts, torch.where(halts, 1.0 - total, h)


class DepthRoutedStack(nn.Module):
    """A shared pool of transformer and identity blocks applied over up to ``max_steps`` routed steps.

    Args:
        dim: token width.
        heads: attention heads of each pool block.
        pool_blocks: transformer blocks in the pool (``P``).
        identity_blocks: identity choices added to the pool (``I``).
        max_steps: the most steps an image takes (``S``).
        mlp_ratio: FFN hidden width of the pool blocks as a multiple of ``dim``.
        activation: FFN activation.
        dropout: attention dropout.
        halting: adaptive computation time on (a halting unit and ponder cost).
        halt_epsilon: ACT halts once the cumulative halting score reaches ``1 - halt_epsilon``.
        ponder_weight: weight of the ponder cost ``mean(n + R) / S``.
        stop_on_identity: an image that picks an identity block halts there.
        sample: pick by Gumbel-max sampling while training (argmax at evaluation); False = argmax always.
        order_prior: initial router bias towards block ``s`` at step ``s`` (the dense order; needs ``step_input=embedding``); 0 = none.
        per_token: every token picks its own block at each step (no halting).
        kind: the router: ``linear``, ``gru`` or ``lstm`` (a memory carried across steps).
        step_input: how the router knows the step: ``embedding`` (a learned bias per step), ``scalar`` or ``none``.
        router_hidden: memory width of a recurrent router; None = ``dim``.
    """

    routes_over_depth = True  # a ViT runs it in a block's place and hands its DepthTrace up (ForwardAux.depth)

    def __init__(
        self,
        dim: int,
        heads: int,
        pool_blocks: int = 4,
        identity_blocks: int = 1,
        max_steps: int = 4,
        mlp_ratio: float = 2.0,
        activation: str = "gelu",
        dropout: float = 0.0,
        halting: bool = False,
        halt_epsilon: float = 0.01,
        ponder_weight: float = 0.01,
        stop_on_identity: bool = False,
        sample: bool = True,
        order_prior: float = 2.0,
        per_token: bool = False,
        kind: str = "linear",
        step_input: str = "embedding",
        router_hidden: int | None = None,
    ) -> None:
        super().__init__()
        if per_token and (halting or stop_on_identity):
            raise ConfigError(
                "model.depth_router.per_token=true routes each token, but halting and stop_on_identity stop whole images; "
                "set halting=false and stop_on_identity=false, or per_token=false."
            )
        if pool_blocks < 1 or identity_blocks < 0 or max_steps < 1:
            raise ConfigError(
                f"model.depth_router needs pool_blocks >= 1, identity_blocks >= 0 and max_steps >= 1 (got {pool_blocks}, {identity_blocks}, {max_steps})."
            )
        if not 0.0 < halt_epsilon < 1.0 or ponder_weight < 0:
            raise ConfigError(f"model.depth_router.halt_epsilon={halt_epsilon} must be in (0, 1) and ponder_weight={ponder_weight} >= 0.")
        hidden = int(mlp_ratio * dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, FeedForward(dim, hidden, activation), dropout) for _ in range(pool_blocks))
        self.num_blocks, self.num_choices, self.max_steps = pool_blocks, pool_blocks + identity_blocks, max_steps
        self.halting, self.threshold, self.ponder_weight = halting, 1.0 - halt_epsilon, ponder_weight
        self.stop_on_identity, self.sample, self.per_token = stop_on_identity, sample, per_token
        self.state_norm = nn.LayerNorm(dim)
        self.controller = DepthController(dim, self.num_choices, max_steps, kind, step_input, router_hidden)
        self.halt_head = nn.Linear(dim, 1) if halting else None
        self.apply(init_weights)
        self._register_load_state_dict_pre_hook(_rename_linear_router)
        with torch.no_grad():
            diagonal = torch.arange(min(max_steps, pool_blocks))
            if self.controller.step_bias is not None:
                self.controller.step_bias[diagonal, diagonal] = order_prior
            if self.halt_head is not None:  # h = 1/S at first: images start by taking every step, the ponder cost trims
                nn.init.constant_(self.halt_head.bias, -math.log(max(max_steps - 1, 1)))
        self.names = [f"b{j}" for j in range(pool_blocks)] + [f"id{j}" for j in range(identity_blocks)]

    def state(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """Pooled, normalised image state ``[B, dim]`` (``weights [B, N]``: a weighted token mean)."""
        pooled = x.mean(dim=1) if weights is None else torch.einsum("bnd,bn->bd", x, weights)
        return self.state_norm(pooled)

    def route(self, state: Tensor, step: int, memory=None) -> Tensor:
        """Router logits ``[B, P + I]`` at ``step`` for pooled states ``[B, dim]`` (a recurrent router: from ``memory``, zeros when None)."""
        return self.controller(state, step, memory)[0]

    def choose(self, logits: Tensor, forced: Tensor | None) -> Tensor:
        """The choice per row: ``forced``, a Gumbel-max sample while training (``sample``), else the argmax."""
        if forced is not None:
            return forced
        if self.training and self.sample:
            return (logits.float() - torch.empty_like(logits, dtype=torch.float).exponential_().log()).argmax(dim=-1)
        return logits.argmax(dim=-1)

    def halt_prob(self, state: Tensor) -> Tensor:
        """ACT halting score ``h [B]`` of pooled states ``[B, dim]``."""
        return torch.sigmoid(self.halt_head(state).squeeze(-1).float())

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
        choices: Tensor | None = None,
        steps: int | None = None,
        outputs: list[Tensor] | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, DepthTrace]:
        """Route ``x [B, N, dim]`` over depth; returns the tokens and the :class:`DepthTrace` of the choices.

        ``mask [B, N]`` False = padding; ``weights [B, N]`` pool weights of the state; ``choices [B, S]`` forces the
        picks (tests, analysis); ``steps`` caps the steps; ``outputs``, when given, receives the state after each step;
        ``rope`` the tokens' rotary position code ``(cos, sin)``, each ``[B, 1, N, head_dim]`` (``ssroute.layers.rope``).
        """
        batch, total_steps = x.shape[0], min(steps or self.max_steps, self.max_steps)
        if self.per_token:
            return self._forward_tokens(x, mask, choices, total_steps, outputs, rope)
        memory = self.controller.initial(batch, x.device)
        active = torch.ones(batch, dtype=torch.bool, device=x.device)
        total = torch.zeros(batch, device=x.device)
        result = torch.zeros_like(x) if self.halting else None
        picks = torch.full((batch, total_steps), -1, dtype=torch.long, device=x.device)  # -1 = halted before this step
        halted_at = torch.full((batch,), float(total_steps), device=x.device)
        remainder = torch.zeros(batch, device=x.device)
        for step in range(total_steps):
            index = active.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            state = self.state(x[index], None if weights is None else weights[index])
            logits, remembered = self.controller(state, step, self.controller.select(memory, index))
            memory = self.controller.update(memory, index, remembered)
            probs = logits.float().softmax(dim=-1)
            choice = self.choose(logits, None if choices is None else choices[index, step])
            picks[index, step] = choice
            gate = probs.gather(1, choice[:, None]).squeeze(1)
            x = self.apply_step(x, index, choice, gate - gate.detach(), mask, rope)
            last = step == total_steps - 1
            force = torch.full_like(choice, last, dtype=torch.bool)
            if self.stop_on_identity:
                force = force | (choice >= self.num_blocks)
            if self.halting:
                h = self.halt_prob(self.state(x[index], None if weights is None else weights[index]))
                total_new, halts, weight = act_step(total[index], h, self.threshold, force)
                total = total.index_copy(0, index, total_new)
                result = result.index_add(0, index, weight.to(x.dtype)[:, None, None] * x[index])
                remainder = remainder.index_copy(0, index, torch.where(halts, weight, remainder[index]))
            else:
                halts = force
            halted_at = halted_at.index_copy(0, index, torch.where(halts, float(step + 1), halted_at[index]))
            active = active.index_copy(0, index, ~halts)
            if outputs is not None:
                outputs.append(result if self.halting and step == total_steps - 1 else x)
        if not self.halting:
            return x, DepthTrace(picks, halted_at, None, None)
        ponder = (halted_at + remainder).mean()  # Graves' ponder cost n + R; R carries the halting units' gradient
        return result, DepthTrace(picks, halted_at, ponder.detach(), self.ponder_weight * ponder / self.max_steps)

    def _forward_tokens(
        self,
        x: Tensor,
        mask: Tensor | None,
        choices: Tensor | None,
        total_steps: int,
        outputs: list[Tensor] | None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, DepthTrace]:
        """Per-token routing: each token picks a block at each step; ``choices`` ``[B, N, S]`` (or ``[B, S]``, every token alike)."""
        batch, tokens, dim = x.shape
        if choices is not None and choices.dim() == 2:
            choices = choices[:, None, :].expand(batch, tokens, choices.shape[1])
        memory = self.controller.initial(batch * tokens, x.device)
        picks = torch.full((batch, tokens, total_steps), -1, dtype=torch.long, device=x.device)
        for step in range(total_steps):
            logits, memory = self.controller(self.state_norm(x).reshape(batch * tokens, dim), step, memory)
            choice = self.choose(logits, None if choices is None else choices[:, :, step].reshape(-1)).view(batch, tokens)
            gate = logits.float().softmax(dim=-1).gather(1, choice.view(-1, 1)).view(batch, tokens)
            out = x
            for j, block in enumerate(self.blocks):  # every block reads the start-of-step state x and writes its own tokens
                out = block_on_tokens(block, x, out, choice == j, gate - gate.detach(), mask, rope)
            x = out
            picks[:, :, step] = choice
            if outputs is not None:
                outputs.append(x)
        halted_at = torch.full((batch, tokens), float(total_steps), device=x.device)
        return x, DepthTrace(picks, halted_at, None, None)

    def apply_step(
        self, x: Tensor, index: Tensor, choice: Tensor, gate: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Apply each image's chosen block: images ``index [A]`` grouped by ``choice [A]``, each pool block run once on its group.

        ``gate [A]`` is zero-valued (``p - sg(p)``) and carries the router's gradient; identity choices leave their images untouched.
        """
        order = choice.argsort(stable=True)
        counts = torch.bincount(choice, minlength=self.num_choices)[: self.num_blocks].tolist()
        start = 0
        for block, count in zip(self.blocks, counts, strict=True):
            if count:
                group = index[order[start : start + count]]
                gate_group = gate[order[start : start + count]].to(x.dtype)[:, None, None]
                before = x[group]
                group_rope = None if rope is None else (rope[0][group], rope[1][group])
                after, _ = block(before, None if mask is None else mask[group], group_rope)
                x = x.index_copy(0, group, after + gate_group * (after - before))
            start += count
        return x


def depth_router_options(depth) -> dict:
    """The routing options of a ``model.depth_router`` config as :class:`DepthRoutedStack` keyword arguments (pool size and steps apart).

    Configs written before ``per_token``, ``kind``, ``step_input`` and ``router_hidden`` existed get their defaults.
    """
    return dict(
        identity_blocks=depth.identity_blocks,
        halting=depth.halting,
        halt_epsilon=depth.halt_epsilon,
        ponder_weight=depth.ponder_weight,
        stop_on_identity=depth.stop_on_identity,
        sample=depth.sample,
        order_prior=depth.order_prior,
        per_token=depth.get("per_token", False),
        kind=depth.get("kind", "linear"),
        step_input=depth.get("step_input", "embedding"),
        router_hidden=depth.get("router_hidden"),
    )


def depth_stack(backbone: nn.Module) -> DepthRoutedStack | None:
    """The backbone's pool routed over depth: ``model=vit_depth``'s stack, or a ``depth`` stage of a ViT stack; None if neither."""
    stack = getattr(backbone, "stack", None)
    if isinstance(stack, DepthRoutedStack):
        return stack
    return next((block for block in getattr(backbone, "blocks", ()) if isinstance(block, DepthRoutedStack)), None)


def _rename_linear_router(state_dict, prefix, *args) -> None:
    """Checkpoints from before the router had its own module: ``router.*`` and ``step_bias`` -> ``controller.*``."""
    for old, new in (
        ("router.weight", "controller.router.weight"),
        ("router.bias", "controller.router.bias"),
        ("step_bias", "controller.step_bias"),
    ):
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)

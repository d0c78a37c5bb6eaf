"""VQ codebook router: a token goes to the expert of its nearest code.

The prototype table of SwAV/DINO made explicit, learned like the VQ-VAE
codebook (van den Oord et al. 2017; EMA updates as in VQ-VAE-2, Razavi et al.
2019; dead-code restarts as in Jukebox, Dhariwal et al. 2020). Routing is one
``[tokens, dim] x [dim, codes]`` distance product and an argmin — a look-up
that stays cheap on a CPU at inference.

- codebook ``[codes, codebook_dim]``, ``codes = E * codes_per_expert``; code
  ``c`` belongs to expert ``c // codes_per_expert``;
- ``update="ema"``: codes are running means of their tokens (a buffer, no
  gradient); ``update="gradient"``: codes are a parameter trained by the
  codebook loss ``|sg(z) - c|^2``; both add ``commitment * |z - sg(c)|^2``;
- k-means initialisation from data with faiss (:meth:`VQRouter.init_codebook`,
  or lazily on the first training batch with ``kmeans_init=True``);
- a code is dead when its recent share of the tokens (an EMA with decay
  ``restart_decay``, fast so that restarts happen within a training stage)
  falls under ``restart_threshold`` times the share it would get under uniform
  use (``1 / codes``); dead codes restart at a random token of the batch.
  Usage is kept as a share of the batch's tokens, so the threshold means the
  same at any batch size;
- ``probs [tokens, experts]`` is the softmax over negative mean squared
  distances divided by ``temperature``, summed over each expert's codes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssroute.errors import ConfigError
from ssroute.routing.base import Router, Routing, check_capacity_factor, register_router, sparse_routing
from ssroute.routing.capacity import expert_capacity, within_capacity
from ssroute.routing.ops import softmax_experts


@register_router("vq")
class VQRouter(Router):
    """Nearest-code routing with an EMA- or gradient-learned codebook.

    >>> import torch
    >>> router = VQRouter(dim=16, num_experts=4, codes_per_expert=2)
    >>> routing = router(torch.randn(10, 16))
    >>> routing.probs.shape, routing.token.tolist() == list(range(10))
    (torch.Size([10, 4]), True)

    Args:
        dim: token width.
        num_experts: number of experts ``E``.
        codes_per_expert: codebook entries per expert.
        codebook_dim: code width; must equal ``dim`` unless ``project``.
        project: learn a linear map ``dim -> codebook_dim`` before the look-up.
        update: ``"ema"`` or ``"gradient"``.
        decay: EMA decay of code sums and usage counts.
        commitment: weight of the commitment loss pulling tokens to their code.
        temperature: softmax temperature on negative mean squared distances.
        gate: combine weight of the chosen expert: ``"prob"`` (its soft
            probability, so the task loss trains the codebook and tokens) or
            ``"one"`` (a pure look-up).
        kmeans_init: initialise the codebook by faiss k-means on the first
            training batch.
        restart_threshold: a code restarts at a token of the batch when its
            recent token share falls below this fraction of the uniform share
            ``1 / codes`` (0.1: under a tenth of its fair share).
        restart_decay: EMA decay of the recent token share used for restarts
            (0.9: an unused code at its fair share is restarted after ~22 steps).
        capacity_factor: optional capacity per expert (tokens fill buffers in
            order); None = no limit.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        codes_per_expert: int = 1,
        codebook_dim: int | None = None,
        project: bool = False,
        update: str = "ema",
        decay: float = 0.99,
        commitment: float = 0.25,
        temperature: float = 0.1,
        gate: str = "prob",
        kmeans_init: bool = False,
        restart_threshold: float = 0.1,
        restart_decay: float = 0.9,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__(dim, num_experts)
        code_dim = dim if codebook_dim is None else codebook_dim
        if code_dim != dim and not project:
            raise ConfigError(f"router vq: codebook_dim={code_dim} does not match dim={dim}; set codebook_dim={dim} or project=true.")
        for key, value, allowed in (("update", update, ("ema", "gradient")), ("gate", gate, ("prob", "one"))):
            if value not in allowed:
                raise ConfigError(f"router vq: {key}={value!r} is not valid; choose one of: {', '.join(allowed)}.")
        self.codes_per_expert, self.code_dim = codes_per_expert, code_dim
        self.update, self.decay, self.commitment = update, decay, commitment
        self.temperature, self.gate, self.kmeans_init = temperature, gate, kmeans_init
        self.restart_threshold, self.restart_decay = restart_threshold, restart_decay
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor)
        self.proj = nn.Linear(dim, code_dim, bias=False) if project else None
        num_codes = num_experts * codes_per_expert
        codebook = torch.randn(num_codes, code_dim)
        fair = 1.0 / num_codes
        if update == "gradient":
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            self.register_buffer("code_sum", codebook * fair)  # EMA of each code's token sum / batch tokens
        self.register_buffer("usage", torch.full((num_codes,), fair))  # EMA of each code's share of the tokens
        self.register_buffer("recent_usage", torch.full((num_codes,), fair))  # the same, faster (restarts)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._init_checked = not kmeans_init

    def flops_per_token(self, tokens_per_group: int) -> float:
        project = 2.0 * self.dim * self.code_dim if self.proj is not None else 0.0
        return project + 2.0 * self.code_dim * self.codebook.shape[0]

    @torch.no_grad()
    def init_codebook(self, data: Tensor, iters: int = 20, seed: int = 0) -> None:
        """k-means (faiss, ``ssroute.kmeans``) initialisation from tokens ``[samples, dim]``."""
        from ssroute.kmeans import kmeans

        if data.dim() != 2 or data.shape[1] != self.dim:
            raise ConfigError(
                f"router vq: init data has shape {list(data.shape)} but the router expects [samples, {self.dim}]; "
                f"pass tokens of width dim={self.dim}."
            )
        z = self.proj(data) if self.proj is not None else data
        num_codes = self.codebook.shape[0]
        if z.shape[0] < num_codes:  # too few points for k-means: start at distinct samples
            centroids = z[torch.randint(z.shape[0], (num_codes,), device=z.device)]
        else:
            centroids = kmeans(z, num_codes, iters, seed, plus_plus=False)[1].to(self.codebook)
        self.set_codebook(centroids)

    @torch.no_grad()
    def set_codebook(self, codes: Tensor) -> None:
        if codes.shape != self.codebook.shape:
            raise ConfigError(
                f"router vq: codebook shape {list(codes.shape)} does not match [codes, codebook_dim]="
                f"{list(self.codebook.shape)}; pass one row per code of width {self.code_dim}."
            )
        fair = 1.0 / codes.shape[0]
        self.codebook.copy_(codes)
        if self.update == "ema":
            self.code_sum.copy_(codes * fair)
        self.usage.fill_(fair)
        self.recent_usage.fill_(fair)
        self.initialized.fill_(True)
        self._init_checked = True

    @torch.no_grad()
    def _restart_dead(self, z: Tensor) -> None:
        # Mutate .data: a restart only moves unused codes, and bumping the version
        # counter would break a backward through an earlier forward (two views).
        num_codes = self.codebook.shape[0]
        fair = 1.0 / num_codes
        dead = (self.recent_usage < self.restart_threshold * fair).unsqueeze(1)
        fresh = z[torch.randint(z.shape[0], (num_codes,), device=z.device)]
        self.codebook.data.copy_(torch.where(dead, fresh, self.codebook.data))
        for stat in (self.usage, self.recent_usage):
            stat.copy_(torch.where(dead.squeeze(1), torch.full_like(stat, fair), stat))
        if self.update == "ema":
            self.code_sum.copy_(torch.where(dead, fresh * fair, self.code_sum))

    @torch.no_grad()
    def _ema_step(self, z: Tensor, code: Tensor) -> None:
        num_codes = self.codebook.shape[0]
        # one-hot [codes, tokens] product: per-code sums in one matmul (index_add is a serial loop on CPU)
        member = (code.unsqueeze(0) == torch.arange(num_codes, device=z.device).unsqueeze(1)).to(z.dtype) / z.shape[0]
        share = member.sum(1)
        self.usage.mul_(self.decay).add_(share, alpha=1 - self.decay)
        self.recent_usage.mul_(self.restart_decay).add_(share, alpha=1 - self.restart_decay)
        if self.update == "ema":
            self.code_sum.mul_(self.decay).add_(member @ z, alpha=1 - self.decay)
            self.codebook.copy_(self.code_sum / self.usage.clamp_min(1e-8).unsqueeze(1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints written before usage was a share (counts, no recent_usage): start both at the fair share
        if prefix + "recent_usage" not in state_dict and prefix + "usage" in state_dict:
            fair = torch.full_like(self.usage, 1.0 / self.usage.numel())
            state_dict[prefix + "usage"], state_dict[prefix + "recent_usage"] = fair, fair.clone()
            if prefix + "code_sum" in state_dict:
                state_dict[prefix + "code_sum"] = state_dict[prefix + "codebook"] * fair[0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, tokens: Tensor, tokens_per_group: int | None = None) -> Routing:
        n = self.group_size(tokens, tokens_per_group)
        z = self.proj(tokens) if self.proj is not None else tokens
        if self.training and not self._init_checked:
            if not bool(self.initialized):
                self.init_codebook(tokens.detach())
            self._init_checked = True
        if self.training:
            self._restart_dead(z.detach())
        # EMA updates the buffer in place after this forward; the graph keeps a copy.
        codes = self.codebook.clone() if self.update == "ema" else self.codebook
        # |z - c|^2 = |z|^2 - 2 z.c + |c|^2; |z|^2 is the same for every code, so the softmax
        # and the argmin skip it. [codes, tokens] layout, viewed as [tokens, codes] (see ops).
        cross = codes @ z.t()
        code_sq = codes.square().sum(1, keepdim=True)
        partial = ((code_sq - 2 * cross) / self.code_dim).t()  # squared distance minus |z|^2/dim
        code_probs = softmax_experts(-partial / self.temperature)
        probs = code_probs if self.codes_per_expert == 1 else code_probs.reshape(-1, self.num_experts, self.codes_per_expert).sum(-1)
        code = partial.detach().t().min(dim=0).indices
        token = torch.arange(tokens.shape[0], device=tokens.device)
        expert = torch.div(code, self.codes_per_expert, rounding_mode="floor")
        if self.update == "ema":  # commitment = mean squared distance to the chosen (constant) code
            # |z|^2 as 2<z, sg(z)> - sg(|z|^2): same value and gradient 2z, one pass each way (pow's backward takes three)
            z_sq = torch.dot(z.reshape(-1), z.detach().reshape(-1))
            z_sq = 2 * z_sq - z_sq.detach()
            aux = self.commitment * (partial.gather(1, code.unsqueeze(1)).mean() + z_sq / (z.shape[0] * self.code_dim))
        else:  # codebook loss |sg(z) - c|^2 plus commitment |z - sg(c)|^2
            chosen = codes.index_select(0, code)
            aux = self.commitment * (z - chosen.detach()).square().mean() + (z.detach() - chosen).square().mean()
        if self.training:
            self._ema_step(z.detach(), code)
        capacity = expert_capacity(self.capacity_factor, 1, n, self.num_experts)
        if capacity is not None:
            keep = within_capacity(token, expert, n, self.num_experts, capacity)
            token, expert = token[keep], expert[keep]
        weight = probs[token, expert] if self.gate == "prob" else probs.new_ones(token.shape)
        return sparse_routing(probs, token, expert, weight, n, aux, capacity)

"""Upcycling (MoEfication): turn a trained dense FFN into ``E`` experts of ``hidden / E`` neurons.

MoEfication (Zhang et al. 2022) observes that a trained FFN's hidden neurons
fire sparsely and in groups, so the FFN is already a mixture of experts: split
its ``H`` neurons into ``E`` groups of equal size with balanced k-means on the
neurons' input weights (:func:`ssroute.kmeans.balanced_kmeans`), make each group an MLP
expert (``w_in [E, dim, H/E]`` = ``fc1`` rows, ``w_out [E, H/E, dim]`` = ``fc2``
columns), and let a router pick ``k`` experts per token. Sparse Upcycling
(Komatsuzaki et al. 2023) starts MoE training from dense weights the same way.

The partition is exact: ``fc2(act(fc1 x)) = sum_e w_out[e]^T act(w_in[e]^T x + b_in[e]) + fc2.bias``
because the activation acts per neuron. ``fc2.bias`` is one shared bias
(``out_bias="shared"`` of the ``mlp`` bank), split equally among a token's
routed rows, so with combine weights 1 every token gets it once for any k:
k = E reproduces the dense FFN, k < E drops only the unselected neurons.

Two selectors (router ``mlp_selection``): an MLP initialised from the cluster
centroids and trained to predict each expert's share of the activation mass
``sum |act(fc1 x)|`` over its neurons (for ReLU the positive activations), as
MoEfication's MLP selection; or ``random=true``, the random-selection baseline.

>>> import torch
>>> from ssroute.layers.mlp import ACTIVATIONS, FeedForward
>>> ffn = FeedForward(dim=8, hidden=16)
>>> bank, centroids = experts_from_ffn(ffn, num_experts=4)
>>> x = torch.randn(5, 8)
>>> from ssroute.experts import ExpertContext
>>> sum_all = bank(x.repeat(4, 1), [5] * 4, ExpertContext(torch.arange(5).repeat(4), 5, 1)).view(4, 5, 8).sum(0)
>>> bool(torch.allclose(sum_all, ffn(x), atol=1e-5)), tuple(centroids.shape)
(True, (4, 9))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssroute.errors import ConfigError
from ssroute.experts.mlp import MLPExperts
from ssroute.kmeans import balanced_kmeans, groups_of
from ssroute.layers.mlp import ACTIVATIONS, FeedForward
from ssroute.routing.selection import MLPSelectionRouter


def check_divisible(hidden: int, num_experts: int) -> None:
    if num_experts < 1 or hidden % num_experts:
        raise ConfigError(
            f"num_experts={num_experts} does not divide the FFN hidden width {hidden} (model.mlp_ratio * model.dim); "
            f"choose a divisor of {hidden}, e.g. {[d for d in (2, 4, 8, 16) if hidden % d == 0]}."
        )


def neuron_groups(ffn: FeedForward, num_experts: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Balanced k-means over the neurons' ``[fc1 weight row, fc1 bias]``: groups ``[E, H/E]``, centroids ``[E, dim+1]``."""
    check_divisible(ffn.fc1.out_features, num_experts)
    points = torch.cat([ffn.fc1.weight, ffn.fc1.bias[:, None]], dim=1).detach()
    assign, centroids = balanced_kmeans(points, num_experts, seed=seed)
    return groups_of(assign, num_experts), centroids


def experts_from_ffn(ffn: FeedForward, num_experts: int, seed: int = 0, groups: Tensor | None = None) -> tuple[MLPExperts, Tensor]:
    """The ``mlp`` bank (``out_bias="shared"``) equal to ``ffn`` at k = E, and the cluster centroids ``[E, dim+1]``."""
    if groups is None:
        groups, centroids = neuron_groups(ffn, num_experts, seed)
    else:
        points = torch.cat([ffn.fc1.weight, ffn.fc1.bias[:, None]], dim=1).detach()
        centroids = points[groups].mean(1)
    dim, hidden = ffn.fc1.in_features, ffn.fc1.out_features
    activation = next(name for name, cls in ACTIVATIONS.items() if isinstance(ffn.act, cls))
    bank = MLPExperts(dim, hidden // num_experts, num_experts, depth=2, activation=activation, out_bias="shared")
    with torch.no_grad():
        bank.w_in.copy_(ffn.fc1.weight[groups].transpose(1, 2))  # [E, H/E, dim] -> [E, dim, H/E]
        bank.b_in.copy_(ffn.fc1.bias[groups])
        bank.w_out.copy_(ffn.fc2.weight.t()[groups])  # [H, dim] rows of each group -> [E, H/E, dim]
        bank.b_out.copy_(ffn.fc2.bias)
    return bank, centroids


def activation_mass(ffn: FeedForward, x: Tensor, groups: Tensor) -> Tensor:
    """``[tokens, E]`` sum of ``|act(fc1 x)|`` over each expert's neurons (MoEfication's selection target)."""
    hidden = ffn.act(ffn.fc1(x)).abs()  # [tokens, H]
    return hidden[:, groups].sum(-1)  # [tokens, E, H/E] -> [tokens, E]


def train_selection_router(
    router: MLPSelectionRouter,
    ffn: FeedForward,
    groups: Tensor,
    inputs: Tensor,
    steps: int = 300,
    batch: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the router's scores to each expert's share of the activation mass of ``inputs [tokens, dim]``.

    Soft cross-entropy between ``softmax(scores)`` and the mass shares; the last
    10% of the tokens are held out to report how often the router's top-1 is the
    most active expert (``top1_match``) and the mass share its top-k captures.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = inputs[torch.randperm(inputs.shape[0], generator=generator)]
    held = max(1, inputs.shape[0] // 10)
    train, test = inputs[:-held], inputs[-held:]
    with torch.no_grad():
        share = activation_mass(ffn, train, groups)
        share = share / share.sum(-1, keepdim=True).clamp_min(1e-12)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    loss = torch.zeros(())
    threads = torch.get_num_threads()
    # Matrices this small run fastest on one thread: OpenMP synchronisation costs more than the
    # work, and on a busy machine two threads were 100x slower. Restored afterwards.
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            pick = torch.randint(0, train.shape[0], (min(batch, train.shape[0]),), generator=generator)
            loss = -(share[pick] * torch.log_softmax(router.scores(train[pick]), -1)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    router.eval()
    with torch.no_grad():
        mass = activation_mass(ffn, test, groups)
        chosen = router.scores(test).topk(router.k, -1).indices
        captured = (mass.gather(1, chosen).sum(-1) / mass.sum(-1).clamp_min(1e-12)).mean()
        match = (router.scores(test).argmax(-1) == mass.argmax(-1)).float().mean()
    return {"loss": float(loss.detach()), "top1_match": float(match), "mass_captured_at_k": float(captured)}

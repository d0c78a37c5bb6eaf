"""Per-token routing over depth, recurrent routers and step inputs, the depth analyses and plots."""

from __future__ import annotations

import json

import pytest
import torch

from ssroute.errors import ConfigError
from ssroute.eval.depth_plots import plot_identity_over_training, write_depth_plots
from ssroute.models.depth_controller import DepthController
from ssroute.models.depth_router import DepthRoutedStack
from ssroute.models.depth_stats import DepthStats, depth_parameters
from ssroute.models.vit_depth import DepthRoutedViT
from ssroute.train.finetune import run_finetune
from ssroute.train.pretrain import run_pretrain


def make_stack(**options) -> DepthRoutedStack:
    torch.manual_seed(0)
    defaults = dict(dim=16, heads=2, pool_blocks=3, identity_blocks=1, max_steps=3, order_prior=0.0)
    return DepthRoutedStack(**{**defaults, **options})


@pytest.mark.parametrize("kind", ["linear", "gru"])
def test_every_token_forced_to_the_same_choice_is_per_image_routing(kind: str) -> None:
    per_image, per_token = make_stack(kind=kind).eval(), make_stack(kind=kind, per_token=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(per_image.state_dict().values(), per_token.state_dict().values(), strict=True))
    x = torch.randn(6, 9, 16)
    choices = torch.tensor([[0, 1, 2], [3, 0, 0], [2, 3, 1], [1, 1, 1], [3, 3, 3], [0, 2, 3]])  # 3 = the identity
    image_out, image_trace = per_image(x, choices=choices)
    token_out, token_trace = per_token(x, choices=choices)  # [B, S]: every token of an image takes the image's choice
    assert torch.allclose(token_out, image_out, atol=1e-5)
    assert token_trace.picks.shape == (6, 9, 3) and torch.equal(token_trace.picks, image_trace.picks[:, None, :].expand(6, 9, 3))


def test_tokens_at_different_depths_attend_to_every_token_of_their_image() -> None:
    stack = make_stack(per_token=True, max_steps=2).eval()
    x = torch.randn(4, 9, 16)
    choices = torch.randint(0, 4, (4, 9, 2), generator=torch.Generator().manual_seed(1))
    calls = []
    for j, block in enumerate(stack.blocks):
        block.register_forward_pre_hook(lambda module, args, j=j: calls.append(j))
    with torch.no_grad():
        out, _ = stack(x, choices=choices)
        during = list(calls)
        # reference: a token taking block j gets block j's output on its whole image at the start of the step
        state = x
        for s in range(2):
            full = torch.stack([block(state)[0] for block in stack.blocks] + [state])  # [choices, B, N, dim]
            state = full[choices[:, :, s], torch.arange(4)[:, None], torch.arange(9)[None, :]]
    assert torch.allclose(out, state, atol=1e-5)
    assert during == [], "per-token routing runs the blocks' parts on the chosen tokens, not block.forward on whole images"


def test_each_block_runs_once_per_step_on_its_tokens() -> None:
    stack = make_stack(per_token=True).eval()
    sizes = []
    for block in stack.blocks:
        block.ffn.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    choices = torch.tensor([0, 0, 1, 3, 3, 0]).view(1, 6, 1).expand(2, 6, 3)
    stack(torch.randn(2, 6, 16), choices=choices)
    assert sizes == [6, 2] * 3  # per step: block 0 on 3 tokens x 2 images, block 1 on 1 x 2, block 2 and the identity never


def test_the_router_learns_per_token_and_halting_is_refused() -> None:
    stack = make_stack(per_token=True, kind="lstm", step_input="scalar").train()
    out, trace = stack(torch.randn(3, 5, 16))
    out.square().sum().backward()
    assert stack.controller.router.weight.grad.abs().sum() > 0 and stack.controller.cell.weight_ih.grad.abs().sum() > 0
    assert trace.picks.shape == (3, 5, 3) and bool((trace.picks >= 0).all())
    with pytest.raises(ConfigError, match="per_token=true routes each token, but halting"):
        make_stack(per_token=True, halting=True)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_a_recurrent_routers_state_changes_its_choice_on_a_planted_sequence(kind: str) -> None:
    # step 0 shows A or B, step 1 shows the same C: the right choice at step 1 is 0 after A and 1 after B.
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 8)
    sequences = torch.stack([torch.stack([a, c]), torch.stack([b, c])])  # [2 sequences, 2 steps, dim]
    target = torch.tensor([0, 1])

    def final_choice(controller: DepthController, train_steps: int) -> torch.Tensor:
        optimizer = torch.optim.Adam(controller.parameters(), lr=0.05)
        for _ in range(train_steps):
            memory = controller.initial(2, torch.device("cpu"))
            for step in range(2):
                logits, memory = controller(sequences[:, step], step, memory)
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad(), loss.backward(), optimizer.step()
        return logits.argmax(-1)

    torch.manual_seed(0)
    assert final_choice(DepthController(8, choices=3, max_steps=2, kind=kind, hidden=8), 100).tolist() == [0, 1]
    torch.manual_seed(0)
    linear = final_choice(DepthController(8, choices=3, max_steps=2, kind="linear"), 100)
    assert linear[0] == linear[1]  # without memory the same state at the same step gets the same choice


def test_step_inputs() -> None:
    state = torch.randn(4, 8)
    none = DepthController(8, 3, max_steps=3, step_input="none")
    assert torch.equal(none(state, 0)[0], none(state, 2)[0]) and none.step_bias is None
    scalar = DepthController(8, 3, max_steps=3, step_input="scalar")
    assert scalar.router.in_features == 9 and not torch.equal(scalar(state, 0)[0], scalar(state, 2)[0])
    embedding = DepthController(8, 3, max_steps=3)
    with torch.no_grad():
        embedding.step_bias[2, 1] = 5.0
    assert torch.allclose(embedding(state, 2)[0] - embedding(state, 0)[0], torch.tensor([0.0, 5.0, 0.0]).expand(4, 3))
    with pytest.raises(ConfigError, match="kind='rnn' is unknown"):
        DepthController(8, 3, 3, kind="rnn")
    with pytest.raises(ConfigError, match="step_input='position' is unknown"):
        DepthController(8, 3, 3, step_input="position")


def test_checkpoints_of_the_linear_router_before_the_controller_still_load() -> None:
    stack = make_stack()
    old = {k.replace("controller.router", "router").replace("controller.step_bias", "step_bias"): v for k, v in stack.state_dict().items()}
    assert "router.weight" in old and "step_bias" in old
    fresh = make_stack(order_prior=3.0)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.controller.step_bias, stack.controller.step_bias)


def test_co_selection_identity_counts_and_parameters() -> None:
    stats = DepthStats(steps=3, choices=4, blocks=3)
    picks = torch.tensor([[[0, 3, 1], [2, 2, 2]], [[3, 3, 0], [0, 1, 2]]])  # per token: 4 paths
    stats.add(picks, torch.full((2, 2), 3.0))
    share = stats.coselect_share()
    assert share[0, 1] == share[1, 0] == 0.5 and share[0, 3] == 0.5 and share[1, 3] == 0.25 and share[2, 3] == 0.0
    assert share.diagonal().eq(0).all()
    assert stats.identity_steps.tolist() == [2, 1, 1, 0]
    metrics = stats.summary(["b0", "b1", "b2", "id0"], order=True)
    assert metrics["depth/identity_paths"] == 0.5 and metrics["depth/coselect/b0/id0"] == 0.5
    stack = make_stack(kind="gru", max_steps=5)
    params = depth_parameters(stack)
    block = sum(p.numel() for p in stack.blocks[0].parameters())
    assert (
        params["depth/params_pool"] == 3 * block
        and params["depth/params_per_step"] == block
        and params["depth/params_dense_blocks"] == 5 * block
    )
    assert params["depth/params_router"] == sum(p.numel() for p in stack.controller.parameters()) + 32  # + the state norm


def test_plots_of_a_per_token_model(tmp_path) -> None:
    torch.manual_seed(0)
    vit = DepthRoutedViT(
        image_size=8, channels=1, dim=16, heads=2, patch_size=2, pool_blocks=2, identity_blocks=1, max_steps=2, per_token=True
    )
    images = torch.randint(0, 255, (5, 1, 8, 8), dtype=torch.uint8)
    paths = write_depth_plots(tmp_path, vit, images.float() / 255, images)
    assert [p.name for p in paths] == ["depth_order.png", "depth_coselection.png", "depth_identity.png", "depth_paths.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    log = tmp_path / "metrics.csv"
    log.write_text("step,depth/identity_share,loss\n0,0.5,\n1,,2.0\n2,0.25,\n")
    assert plot_identity_over_training(tmp_path / "identity.png", log).is_file()


@pytest.mark.slow
def test_per_token_gru_routing_pretrains_and_finetunes(tmp_path, pretrain_cfg, finetune_cfg) -> None:
    small = ["model=vit_depth", "model.dim=32", "model.depth=2", "trainer.max_epochs=1", "data.train_subset=256", "evaluate=true",
             "model.depth_router.per_token=true", "model.depth_router.kind=gru", "model.depth_router.step_input=scalar",
             "evaluation.max_routing_images=64", "evaluation.stability_strengths=[1.0]", "evaluation.fewshot_draws=1"]  # fmt: skip
    run = run_pretrain(pretrain_cfg([*small, "trainer.knn_every_n_epochs=0"]), tmp_path / "pre")
    metrics = json.loads((run / "metrics.json").read_text())
    assert sum(v for k, v in metrics.items() if k.startswith("depth/order/s0/")) == pytest.approx(1.0)  # shares of tokens
    assert metrics["depth/params_per_step"] > 0 and "depth/coselect/b0/b1" in metrics
    assert (run / "eval" / "plots" / "depth_paths.png").is_file()
    out = run_finetune(finetune_cfg([f"checkpoint={run}", "trainer.max_epochs=1", "data.train_subset=256"]), tmp_path / "ft", overrides=[])
    assert "depth/blocks_per_image" in json.loads((out / "metrics.json").read_text())

import math

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from ssroute.data.views import ViewAugment
from ssroute.eval.agreement import load_entropy as usage_entropy
from ssroute.eval.analytics import analyse_routings, co_selection, routing_analytics
from ssroute.eval.stability import IDENTITY
from ssroute.models import build_backbone
from ssroute.routing.base import sparse_routing

E = 3


def top1_routing(experts: list[int], tokens_per_image: int, num_experts: int = E):
    """A k=1 routing sending token t to ``experts[t]`` with one-hot probs."""
    expert = torch.tensor(experts)
    probs = torch.nn.functional.one_hot(expert, num_experts).float()
    return sparse_routing(probs, torch.arange(len(experts)), expert, torch.ones(len(experts)), tokens_per_image)


def test_known_class_expert_assignment_gives_the_known_matrix():
    # four images of four tokens; classes 0, 1, 0, 2 (class 3 has no image)
    experts = [0, 0, 0, 1] + [1, 1, 1, 1] + [0, 0, 2, 2] + [2, 2, 2, 2]
    labels = torch.tensor([0, 1, 0, 2])
    result = analyse_routings({1: top1_routing(experts, 4)}, images=4, labels=labels, num_classes=4)
    expected = torch.tensor([[5 / 8, 1 / 8, 2 / 8], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float64)
    assert torch.allclose(result.blocks["block1"].class_expert, expected)
    m = result.metrics
    assert m["block1/class_expert_purity"] == pytest.approx(13 / 16)  # column majorities: 5 + 4 + 4 of 16 tokens
    token_classes = labels.repeat_interleave(4).tolist()
    assert m["block1/class_expert_nmi"] == pytest.approx(normalized_mutual_info_score(token_classes, experts))


def test_unlabelled_images_are_ignored_and_no_labels_skip_the_class_matrix():
    routing = top1_routing([0, 1, 2, 2], tokens_per_image=2)
    result = analyse_routings({0: routing}, images=2, labels=torch.tensor([1, -1]), num_classes=2)
    assert result.blocks["block0"].class_expert.tolist() == [[0, 0, 0], [0.5, 0.5, 0]]
    bare = analyse_routings({0: routing}, images=2)
    assert bare.blocks["block0"].class_expert is None and "block0/class_expert_nmi" not in bare.metrics


def test_load_dropped_and_dead_experts_of_a_hand_made_routing():
    # 4 experts, 6 tokens; token 5 is dropped, expert 3 never used
    probs = torch.full((6, 4), 0.25)
    routing = sparse_routing(probs, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 0, 0, 1, 2]), torch.ones(5), tokens_per_group=6)
    m = analyse_routings({2: routing}, images=1).metrics
    assert m["block2/load_max_share"] == pytest.approx(3 / 5)
    assert m["block2/dropped_share"] == pytest.approx(1 / 6)
    assert m["block2/unaugmented_dead_experts"] == 1.0
    assert m["block2/experts_per_token"] == pytest.approx(5 / 6)
    shares = torch.tensor([0.6, 0.2, 0.2])
    assert m["block2/unaugmented_usage_entropy"] == pytest.approx(float(-(shares * shares.log()).sum() / math.log(4)))
    assert usage_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)


def test_co_selection_of_hand_made_k2_routings():
    # three tokens: {0, 1}, {0, 2}, {0, 1}
    routing = sparse_routing(
        torch.full((3, E), 1 / E),
        torch.tensor([0, 0, 1, 1, 2, 2]),
        torch.tensor([0, 1, 0, 2, 1, 0]),
        torch.full((6,), 0.5),
        tokens_per_group=3,
    )
    expected = torch.tensor([[3, 2, 1], [2, 2, 0], [1, 0, 1]], dtype=torch.float64) / 3
    assert torch.allclose(co_selection(routing), expected)


def test_block_vs_block_matrix_of_a_hand_made_pair():
    first = top1_routing([0, 0, 1, 1, 2, 2], tokens_per_image=3)
    second = top1_routing([1, 1, 0, 0, 0, 0], tokens_per_image=3, num_experts=2)
    result = analyse_routings({3: second, 1: first}, images=2)
    joint = result.cross_block[("block1", "block3")]
    assert torch.allclose(joint, torch.tensor([[0, 2], [2, 0], [2, 0]], dtype=torch.float64) / 6)
    expected = normalized_mutual_info_score([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 0, 0])
    assert result.metrics["block1/block3/expert_nmi"] == pytest.approx(expected)
    same = analyse_routings({1: first, 2: first}, images=2)
    assert same.metrics["block1/block2/expert_nmi"] == pytest.approx(1.0)


@pytest.mark.parametrize("router", ["token_choice", "soft_moe"])
def test_analytics_of_a_backbone_do_not_depend_on_the_batch_split(pretrain_cfg, router):
    cfg = pretrain_cfg(
        ["model.moe_layers=[0,1]", "model.num_experts=4", "model.patch_size=2", f"router={router}"]
        + (["router.k=2"] if router == "token_choice" else [])
    )
    torch.manual_seed(0)
    backbone = build_backbone(cfg, image_size=8, channels=1)
    images = ViewAugment(IDENTITY, 1, 8, (0.3,), (0.4,)).normalize(torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8))
    labels = torch.arange(20) % 3
    whole = routing_analytics(backbone, images, labels, 3)
    split = routing_analytics(backbone, images, labels, 3, batch_size=7)
    assert list(whole.blocks) == ["block0", "block1"] and list(whole.cross_block) == [("block0", "block1")]
    assert whole.metrics == pytest.approx(split.metrics, nan_ok=True)
    block = whole.blocks["block1"]
    assert block.top1.shape == (20 * 16,) and block.class_expert.shape == (3, 4)
    assert torch.allclose(block.class_expert.sum(dim=1), torch.ones(3, dtype=torch.float64))
    if router == "token_choice":
        # diagonal = share of tokens using each expert, so it sums to the mean experts per token
        assert float(block.co_selection.diagonal().sum()) == pytest.approx(whole.metrics["block1/experts_per_token"])
        assert torch.equal(block.co_selection, block.co_selection.T)
    else:
        assert block.co_selection is None


def test_a_dense_backbone_has_no_routing_analytics(pretrain_cfg):
    backbone = build_backbone(pretrain_cfg(["model.patch_size=2"]), image_size=8, channels=1)
    result = routing_analytics(backbone, torch.randn(4, 1, 8, 8), None, None)
    assert result.blocks == {} and result.metrics == {}

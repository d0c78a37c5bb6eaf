"""Patch selectors: entropy scores, top-k, non-overlapping max-sum against brute force, random, lattice grid, extraction."""

import itertools
import math

import pytest
import torch

from ssroute.config import PatchesConfig
from ssroute.errors import ConfigError
from ssroute.patches import PATCH_SELECTORS, build_patch_selector, candidate_centres, extract_patches
from ssroute.patches.base import overlaps
from ssroute.patches.entropy import EntropyTopK, local_entropy
from ssroute.patches.maxsum import EntropyMaxSum, greedy_nms, strip_dp


def test_local_entropy_is_the_histogram_entropy_of_each_window():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, :2, :2] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # two levels, two pixels each
    image[0, 0, 2:, 2:] = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # one pixel at 0, three at 1
    scores = local_entropy(image, patch_size=2, stride=2, bins=2)
    expected = torch.tensor([[math.log(2), 0.0], [0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    assert torch.allclose(scores[0], expected, atol=1e-6)
    assert torch.equal(local_entropy(torch.ones(2, 3, 6, 6), 2), torch.zeros(2, 5, 5))  # flat colour images score 0


def test_a_larger_window_is_centred_on_the_patch():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 0, 2] = 1.0  # one bright pixel, in the second patch of the top row
    scores = local_entropy(image, patch_size=2, stride=2, window=4, bins=2)  # 4x4 window around each 2x2 patch
    assert scores[0, 0, 0] > 0 and scores[0, 0, 1] > 0 and scores[0, 0, 2] == 0  # the window reaches 1 px beyond the patch
    assert local_entropy(image, patch_size=2, stride=2, bins=2)[0, 0, 0] == 0


def planted(size, corners, patch=4):
    """Images with 4x4 squares holding 16 distinct levels at the given top-left corners on a 0 background."""
    images = torch.zeros(len(corners), 1, size, size)
    levels = torch.randperm(16, generator=torch.Generator().manual_seed(0)).float().view(4, 4)
    for b, squares in enumerate(corners):
        for x, y in squares:
            images[b, 0, y : y + patch, x : x + patch] = levels
    return images


def test_entropy_topk_returns_the_planted_squares_in_any_batch_position():
    corners = [[(3, 5), (11, 1)], [(0, 12), (9, 9)]]
    selector = EntropyTopK(patch_size=4, image_size=16, num_patches=2, stride=1, entropy_bins=16)
    centres = selector(planted(16, corners))
    for b, squares in enumerate(corners):
        assert sorted(map(tuple, centres[b].tolist())) == sorted((x + 1.5, y + 1.5) for x, y in squares)


def brute_force(scores, candidates, num, patch):
    """Best summed score of ``num`` pairwise non-overlapping candidates, by enumeration."""
    clash = overlaps(candidates, candidates, patch)
    best = -math.inf
    for combo in itertools.combinations(range(len(candidates)), num):
        if not any(clash[i, j] for i, j in itertools.combinations(combo, 2)):
            best = max(best, float(scores[list(combo)].sum()))
    return best


@pytest.mark.parametrize("num,gap", [(1, 2), (2, 2), (3, 3), (4, 2)])
def test_strip_dp_is_the_exact_optimum_over_strips(num, gap):
    torch.manual_seed(num * 10 + gap)
    scores = torch.rand(6, 3, 7)  # 6 images, 3 strips of 7 positions
    picked = strip_dp(scores, num, gap)
    got = scores.flatten(1).gather(1, picked).sum(1)
    for b in range(6):
        strip, pos = picked[b] // 7, picked[b] % 7
        for i, j in itertools.combinations(range(num), 2):
            assert strip[i] != strip[j] or abs(int(pos[i]) - int(pos[j])) >= gap
        best = max(
            float(scores[b].flatten()[list(c)].sum())
            for c in itertools.combinations(range(21), num)
            if all(a // 7 != d // 7 or abs(a % 7 - d % 7) >= gap for a, d in itertools.combinations(c, 2))
        )
        assert got[b].item() == pytest.approx(best, abs=1e-5)


def test_entropy_maxsum_is_non_overlapping_and_exact_at_patch_stride():
    torch.manual_seed(1)
    images = torch.rand(4, 1, 9, 9)
    selector = EntropyMaxSum(patch_size=3, image_size=9, num_patches=4, stride=3, entropy_bins=4)
    scores = selector.scores(images)
    picked = selector.select(scores)
    for b in range(4):
        assert not overlaps(selector.candidates[picked[b]], selector.candidates[picked[b]], 3).fill_diagonal_(False).any()
        assert scores[b, picked[b]].sum().item() == pytest.approx(brute_force(scores[b], selector.candidates, 4, 3), abs=1e-5)
    assert (scores.gather(1, picked).diff(dim=1) <= 0).all()  # most informative first


def test_entropy_maxsum_beats_greedy_and_keeps_within_its_bound_of_brute_force():
    torch.manual_seed(2)
    selector = EntropyMaxSum(patch_size=3, image_size=8, num_patches=3, stride=1)
    images = torch.rand(6, 1, 8, 8) * (torch.rand(6, 1, 8, 8) > 0.5)
    scores = selector.scores(images)
    picked = selector.select(scores)
    greedy, found = greedy_nms(scores, selector.candidates, 3, 3)
    for b in range(6):
        chosen = selector.candidates[picked[b]]
        assert not overlaps(chosen, chosen, 3).fill_diagonal_(False).any()
        total, optimum = scores[b, picked[b]].sum().item(), brute_force(scores[b], selector.candidates, 3, 3)
        assert optimum / 4 - 1e-6 <= total <= optimum + 1e-5
        if found[b].all():
            assert total >= scores[b, greedy[b]].sum().item() - 1e-6


def test_maxsum_differs_from_topk_and_from_greedy_on_one_planted_square():
    image = planted(12, [[(4, 4)]])
    topk = EntropyTopK(patch_size=4, image_size=12, num_patches=2)(image)[0]
    selector = EntropyMaxSum(patch_size=4, image_size=12, num_patches=2)
    scores = selector.scores(image)
    picked = selector.select(scores)[0]
    assert overlaps(topk[:1], topk[1:], 4).item()  # the two best candidates share pixels
    assert topk[0].tolist() == [5.5, 5.5]  # the planted square itself
    # every patch clear of the square scores 0, so two halves of it beat the whole square plus nothing
    assert sorted(selector.candidates[picked].tolist()) == [[3.5, 5.5], [7.5, 5.5]]
    assert scores[0, picked].sum().item() == pytest.approx(brute_force(scores[0], selector.candidates, 2, 4), abs=1e-5)
    greedy, _ = greedy_nms(scores, selector.candidates, 2, 4)
    assert scores[0, picked].sum() > scores[0, greedy[0]].sum() + 0.4


def test_extraction_copies_pixels_at_integer_positions_and_interpolates_between():
    images = torch.randn(2, 3, 8, 8)
    centres = candidate_centres(8, 2, 2).expand(2, -1, -1)
    grid_pixels = torch.nn.functional.unfold(images, 2, stride=2).transpose(1, 2)  # [B, 16, C*2*2], conv-kernel layout
    assert torch.allclose(extract_patches(images, centres, 2), grid_pixels, atol=1e-6)
    shifted = extract_patches(images, centres[:, :1] + torch.tensor([0.5, 0.0]), 2).view(2, 3, 2, 2)
    assert torch.allclose(shifted[..., 0], (images[..., :2, 0] + images[..., :2, 1]) / 2, atol=1e-6)


def test_random_centres_stay_inside_follow_the_seed_and_are_fixed_in_eval():
    selector = PATCH_SELECTORS.build("random", patch_size=4, image_size=16, num_patches=50)
    torch.manual_seed(3)
    first = selector(torch.zeros(8, 1, 16, 16))
    torch.manual_seed(3)
    assert torch.equal(first, selector(torch.zeros(8, 1, 16, 16)))
    assert first.min() >= 1.5 and first.max() <= 13.5 and first.std() > 3
    selector.eval()
    assert torch.equal(selector(torch.zeros(2, 1, 16, 16)), selector(torch.zeros(2, 1, 16, 16)))


def test_lattice_grid_spreads_n_patches_and_the_full_grid_is_the_convolution():
    lattice = build_patch_selector(PatchesConfig(name="grid", num_patches=9), patch_size=2, image_size=8, dim=16)
    assert sorted({x for x, _ in lattice.centres.tolist()}) == [0.5, 3.5, 6.5]
    assert build_patch_selector(PatchesConfig(name="grid", num_patches=16), 2, 8, 16) is None


@pytest.mark.parametrize(
    "cfg",
    [
        PatchesConfig(name="nearest"),
        PatchesConfig(name="grid", num_patches=10),
        PatchesConfig(name="entropy_topk", stride=3),
        PatchesConfig(name="entropy_topk", entropy_window=5),
        PatchesConfig(name="entropy_maxsum", num_patches=50),
        PatchesConfig(name="sequential", halt_epsilon=1.5),
        PatchesConfig(name="random", num_patches=0),
    ],
)
def test_bad_patch_configs_name_the_key(cfg):
    with pytest.raises(ConfigError, match="patch"):
        build_patch_selector(cfg, patch_size=4, image_size=28, dim=16)


@pytest.mark.parametrize("name", PATCH_SELECTORS.names())
def test_every_selector_gives_n_centres_for_a_batch(name):
    selector = build_patch_selector(PatchesConfig(name=name, num_patches=9), patch_size=2, image_size=8, dim=16)
    centres = selector(torch.rand(5, 3, 8, 8))
    assert centres.shape == (5, 9, 2) and centres.min() >= 0.5 and centres.max() <= 6.5

import math

import pytest
import torch

from ssroute.config import AugmentConfig
from ssroute.data.correspondence import content_share, grid_correspondence, map_points, nearest_correspondence, view_matches, view_to_view
from ssroute.data.views import ViewAugment
from ssroute.layers.patch_embed import grid_centres


def crop_scale(x0: float, y0: float, scale: float) -> torch.Tensor:
    """Original -> view for a crop at (x0, y0) resized by ``scale``."""
    return torch.tensor([[scale, 0.0, -scale * x0], [0.0, scale, -scale * y0], [0.0, 0.0, 1.0]])


def hflip(width: int) -> torch.Tensor:
    return torch.tensor([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def rotation(degrees: float, centre: float) -> torch.Tensor:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return torch.tensor([[c, -s, centre - c * centre + s * centre], [s, c, centre - s * centre - c * centre], [0.0, 0.0, 1.0]])


def truth(point, *steps):
    """Apply plain-Python affine steps to a point (the reference, independent of the matrices)."""
    x, y = point
    for kind, args in steps:
        if kind == "crop":
            x0, y0, s = args
            x, y = s * (x - x0), s * (y - y0)
        elif kind == "flip":
            x = args - 1 - x
        elif kind == "rot":
            deg, c0 = args
            c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
            x, y = c * (x - c0) - s * (y - c0) + c0, s * (x - c0) + c * (y - c0) + c0
    return x, y


def inverse_steps(steps):
    inv = []
    for kind, args in reversed(steps):
        if kind == "crop":
            x0, y0, s = args
            inv.append(("uncrop", (x0, y0, s)))
        elif kind == "flip":
            inv.append(("flip", args))
        else:
            inv.append(("rot", (-args[0], args[1])))
    return inv


def apply(point, steps):
    x, y = point
    for kind, args in steps:
        if kind == "uncrop":
            x0, y0, s = args
            x, y = x / s + x0, y / s + y0
        else:
            x, y = truth((x, y), (kind, args))
    return x, y


@pytest.mark.parametrize(
    "steps1,steps2",
    [
        ([("crop", (4.0, 2.0, 1.5))], [("crop", (1.0, 6.0, 0.8))]),  # crop + scale both views
        ([("flip", 28)], [("crop", (3.0, 3.0, 1.25))]),  # flip vs crop
        ([("rot", (12.0, 13.5))], [("rot", (-7.0, 13.5)), ("flip", 28)]),  # small rotations and a flip
        ([("crop", (2.0, 5.0, 1.2)), ("rot", (9.0, 13.5))], [("flip", 28), ("crop", (0.5, 0.5, 1.1))]),
    ],
)
def test_mapped_centres_match_the_analytic_truth(steps1, steps2):
    matrices = {"crop": lambda a: crop_scale(*a), "flip": hflip, "rot": lambda a: rotation(*a)}

    def compose(steps):
        m = torch.eye(3)
        for kind, args in steps:
            m = matrices[kind](args) @ m
        return m

    m1, m2 = compose(steps1).unsqueeze(0), compose(steps2).unsqueeze(0)
    centres = grid_centres(28, 4).unsqueeze(0)  # view-1 patch centres
    mapped = view_to_view(centres, m1, m2)[0]
    for (x, y), (mx, my) in zip(centres[0].tolist(), mapped.tolist(), strict=True):
        ox, oy = apply((x, y), inverse_steps(steps1))  # view 1 -> original, by hand
        tx, ty = ox, oy
        for step in steps2:
            tx, ty = truth((tx, ty), step)
        assert abs(mx - tx) < 1e-4 and abs(my - ty) < 1e-4


def test_identity_views_match_every_patch_to_itself():
    eye = torch.eye(3).expand(3, 3, 3)
    centres = grid_centres(28, 4).expand(3, -1, -1)
    match = grid_correspondence(centres, eye, eye, image_size=28, patch_size=4)
    assert match.valid.all() and torch.equal(match.partner, torch.arange(49).expand(3, 49))


def test_shift_by_one_patch_moves_partners_and_masks_the_edge():
    shift = crop_scale(4.0, 0.0, 1.0).unsqueeze(0)  # view 2 starts 4 px (one patch) to the right
    centres = grid_centres(28, 4).unsqueeze(0)
    match = grid_correspondence(centres, torch.eye(3).unsqueeze(0), shift, image_size=28, patch_size=4)
    column = torch.arange(49) % 7
    assert torch.equal(match.valid[0], column >= 1)  # the first column is cropped away
    assert torch.equal(match.partner[0][column >= 1], torch.arange(49)[column >= 1] - 1)


def test_nearest_search_agrees_with_the_grid_rule():
    torch.manual_seed(0)
    m = torch.stack([crop_scale(1.3, 2.1, 1.1) @ rotation(5.0, 13.5), hflip(28)])
    centres = grid_centres(28, 4).expand(2, -1, -1)
    grid = grid_correspondence(centres, torch.eye(3).expand(2, 3, 3), m, 28, 4)
    near = nearest_correspondence(centres, torch.eye(3).expand(2, 3, 3), m, centres, 28, 4)
    assert torch.equal(grid.valid, near.valid)
    assert torch.equal(grid.partner[grid.valid], near.partner[near.valid])


@pytest.mark.parametrize("cfg", [AugmentConfig(crop_scale=(0.3, 1.0), hflip=0.5, rotation=15.0, color_jitter=0.0)])
def test_kornia_matrices_say_where_pixels_went(cfg):
    torch.manual_seed(0)
    augment = ViewAugment(cfg, channels=1, image_size=28, mean=(0.0,), std=(1.0,))
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 9:12, 15:18] = 255  # a bright 3x3 blob centred at (x=16, y=10)
    view, matrix, _ = augment.view(images)
    expected = map_points(torch.tensor([[[16.0, 10.0]]]).expand(64, 1, 2), matrix)[:, 0]
    weights = view[:, 0].clamp_min(0)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = weights.sum(dim=(1, 2))
    centroid = torch.stack([(weights * xs).sum(dim=(1, 2)) / mass, (weights * ys).sum(dim=(1, 2)) / mass], dim=1)
    inside = ((expected > 3) & (expected < 24)).all(dim=1) & (mass > 0)
    assert inside.sum() > 20
    assert (centroid[inside] - expected[inside]).abs().max() < 1.0


def test_pairs_with_a_patch_of_rotation_padding_are_invalid():
    # rotation after the crop fills the view's corners with zeros; the inverse matrix maps them back onto image pixels
    torch.manual_seed(0)
    cfg = AugmentConfig(crop_scale=(0.5, 0.5), crop_ratio=(1.0, 1.0), hflip=0.0, rotation=20.0, color_jitter=0.0)
    augment = ViewAugment(cfg, channels=1, image_size=32, mean=(0.0,), std=(1.0,))
    views = augment(torch.full((64, 1, 32, 32), 200, dtype=torch.uint8), num_views=2)
    centres = grid_centres(32, 4).expand(64, -1, -1)
    geometry = dict(image_size=32, patch_size=4, grid=True)
    matrices = (views.matrices[0], views.matrices[1])
    plain, _ = view_matches(matrices, (centres, centres), **geometry)
    checked, _ = view_matches(matrices, (centres, centres), content=(views.content[0], views.content[1]), **geometry)
    share1 = content_share(views.content[0], centres, 4)
    share2 = torch.gather(content_share(views.content[1], centres, 4), 1, checked.partner)
    assert bool((share1[checked.valid] >= 0.5).all() and (share2[checked.valid] >= 0.5).all())
    padded = plain.valid & ~checked.valid
    assert padded.float().mean() > 0.02  # mapping alone would have paired these padding patches
    assert torch.equal(checked.valid, plain.valid & (share1 >= 0.5) & torch.gather(content_share(views.content[1], centres, 4) >= 0.5, 1, plain.partner))
    # the content mask is exactly where the view shows the image: the photometric-free view is 200/255 there, 0 in the padding
    assert torch.allclose(views.images[0], views.content[0] * 200 / 255, atol=1e-4)


def test_soft_partners_equal_the_hard_ones_when_mapped_points_fall_on_patch_centres():
    centres = grid_centres(8, 2).expand(3, -1, -1)
    shift = torch.stack([torch.eye(3), crop_scale(-2.0, 0.0, 1.0), crop_scale(0.0, 4.0, 1.0)])  # identity and whole-patch moves
    match = grid_correspondence(centres, torch.eye(3).expand(3, 3, 3), shift, image_size=8, patch_size=2)
    values = torch.randn(3, 16, 5)
    from ssroute.data.correspondence import partner_blend

    valid = match.valid
    assert valid.any(dim=1).all()
    assert torch.allclose(partner_blend(values, match)[valid], partner_blend(values, match, soft=False)[valid])


def test_soft_partners_are_the_bilinear_blend_around_the_mapped_point():
    from ssroute.data.correspondence import bilinear_cells, partner_blend

    values = torch.arange(16.0).view(1, 16, 1)  # value = cell index on a 4x4 grid of 2-pixel patches
    point = torch.tensor([[[1.0, 2.5]]])  # x a quarter of the way from cell column 0 to 1, y on row 1
    neighbours, weights = bilinear_cells(point, image_size=8, patch_size=2)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(1, 1))
    match = grid_correspondence(point, torch.eye(3)[None], torch.eye(3)[None], image_size=8, patch_size=2)
    assert partner_blend(values, match).item() == pytest.approx(0.75 * 4 + 0.25 * 5)
    _, edge = bilinear_cells(torch.tensor([[[-0.5, 0.5]]]), image_size=8, patch_size=2)  # left of the first column
    assert edge[0, 0].tolist() == [0.0, 1.0, 0.0, 0.0]  # the off-grid cell gets no weight

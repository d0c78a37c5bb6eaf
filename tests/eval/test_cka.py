import torch

from ssroute.eval.cka import linear_cka


def test_cka_is_invariant_to_rotation_and_scale_and_low_for_unrelated_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert abs(linear_cka(x, 0.5 * x @ q + 3.0) - 1.0) < 1e-9
    assert linear_cka(x, torch.randn(500, 16, generator=g)) < 0.1


def test_cka_matches_a_hand_computed_case():
    # x = [1, 2, 3, 4], y = [1, 2, 3, 5] (one feature each): CKA = squared correlation
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [2.0], [3.0], [5.0]], dtype=torch.float64)
    r = torch.corrcoef(torch.cat([x, y], dim=1).t())[0, 1]
    assert abs(linear_cka(x, y) - float(r**2)) < 1e-9

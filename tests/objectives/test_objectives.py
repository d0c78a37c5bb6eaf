import pytest
import torch
from omegaconf import OmegaConf

from ssroute.config import SSLConfig
from ssroute.errors import ConfigError
from ssroute.models.vit import ViT
from ssroute.objectives import OBJECTIVES, build_objective


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_loss_decreases_on_a_fixed_batch(name):
    torch.manual_seed(0)
    encoder = ViT(image_size=8, channels=1, dim=32, depth=1, heads=2, patch_size=2)
    cfg = OmegaConf.structured(SSLConfig(name=name, proj_hidden=64, proj_dim=32))
    if name == "dino":
        cfg.options = {"prototypes": 64}
    objective = build_objective(name, encoder, 32, cfg)
    images = torch.randn(32, 1, 8, 8)
    views = [images + 0.1 * torch.randn_like(images) for _ in range(objective.num_views)]
    params = [p for p in list(encoder.parameters()) + list(objective.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for step in range(15):
        features = [encoder(v)[0] for v in views]
        loss = objective(features, views, encoder)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.on_step_end(encoder, step / 15)
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < losses[0]


def test_teacher_follows_the_student_by_ema():
    encoder = torch.nn.Linear(4, 8)
    objective = build_objective("byol", encoder, 8, OmegaConf.structured(SSLConfig(name="byol", proj_hidden=16, proj_dim=8, momentum=0.5)))
    teacher = objective.teacher.encoder
    assert not any(p.requires_grad for p in objective.teacher.parameters())
    with torch.no_grad():
        encoder.weight.add_(1.0)
    before = teacher.weight.clone()
    objective.on_step_end(encoder, progress=0.0)  # momentum 0.5 at the start
    assert torch.allclose(teacher.weight, 0.5 * before + 0.5 * encoder.weight)


def test_unknown_objective_and_bad_options_are_clear():
    encoder = torch.nn.Linear(4, 8)
    with pytest.raises(ConfigError, match="unknown SSL objective 'mae'; choose one of"):
        build_objective("mae", encoder, 8, OmegaConf.structured(SSLConfig()))
    cfg = OmegaConf.structured(SSLConfig(name="simclr"))
    cfg.options = {"prototypes": 3}
    with pytest.raises(ConfigError, match=r"ssl.options .* do not fit the simclr objective"):
        build_objective("simclr", encoder, 8, cfg)

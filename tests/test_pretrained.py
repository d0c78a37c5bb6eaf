"""ssroute.load: a run folder, a .ckpt or latest -> a backbone in eval mode with embed, tokens and route."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import ssroute
from ssroute.data.views import normalize
from ssroute.errors import ConfigError
from tests.conftest import write_checkpoint

ROUTED = ["model.moe_layers=[1]", "model.num_experts=4", "router.k=2", "router.capacity_factor=null"]


def digits(count=6):
    return torch.from_numpy(np.round(load_digits().images[:count] * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)


def test_load_gives_the_checkpoints_backbone_with_its_normalisation(tmp_path):
    run = write_checkpoint(tmp_path / "run", ROUTED)
    model = ssroute.load(run)
    assert not model.training and model.inputs.image_size == 8 and model.inputs.channels == 1
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(v, state[f"backbone.{k}"]) for k, v in model.backbone.state_dict().items())
    images = digits()
    with torch.no_grad():
        expected = model.backbone(normalize(images, model.mean, model.std))[0]
        assert torch.equal(model.embed(images), expected) and torch.equal(model(images), expected)
        assert torch.equal(model.embed(images.float() / 255), expected)  # [0, 1] floats are the same images
        assert torch.allclose(model.tokens(images).mean(dim=1), expected, atol=1e-6)  # grid: features = mean token


def test_route_reports_the_executed_top_k_of_the_routers_distribution(tmp_path):
    model = ssroute.load(write_checkpoint(tmp_path / "run", ROUTED))
    images = digits()
    with torch.no_grad():
        routes = model.route(images)
    assert list(routes) == [1]
    route = routes[1]
    assert route.experts.shape == (6, 16, 2) and route.probs.shape == (6, 16, 4) and route.centres.shape == (6, 16, 2)
    # token choice without capacity keeps each patch's top-2 of its distribution, weighted by their probabilities
    top = route.probs.topk(2, dim=-1)
    assert torch.equal(route.experts, top.indices) and torch.allclose(route.weights, top.values)
    assert torch.allclose(route.probs.sum(-1), torch.ones(6, 16))
    assert route.centres[0, :2].tolist() == [[0.5, 0.5], [2.5, 0.5]]  # row-major 2x2 patches


def test_route_marks_dropped_patches_and_spreads_image_routing_over_patches(tmp_path):
    capped = ssroute.load(
        write_checkpoint(tmp_path / "capped", ["model.moe_layers=[1]", "model.num_experts=4", "router.k=1", "router.capacity_factor=0.25"])
    )
    with torch.no_grad():
        route = capped.route(digits())[1]
    dropped = route.experts[..., 0] == -1
    assert dropped.any() and (route.weights[dropped] == 0).all()  # capacity 1 per expert and image: 4 of 16 patches run
    assert ((~dropped).sum(dim=1) <= 4).all()
    image = ssroute.load(write_checkpoint(tmp_path / "image", ["model.moe_layers=[1]", "model.num_experts=4", "router=image"]))
    with torch.no_grad():
        route = image.route(digits())[1]
    assert route.experts.shape[:2] == (6, 16) and (route.experts == route.experts[:, :1]).all()  # one decision per image


def test_dense_model_routes_nothing_and_old_checkpoints_measure_their_inputs(tmp_path):
    recorded = ssroute.load(write_checkpoint(tmp_path / "new", []))
    rebuilt = ssroute.load(write_checkpoint(tmp_path / "old", [], record_inputs=False))  # written before inputs were recorded
    assert recorded.route(digits()) == {} and recorded.inputs == rebuilt.inputs


def test_load_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a run folder .* nor an exported folder"):
        ssroute.load(tmp_path / "empty")
    model = ssroute.load(write_checkpoint(tmp_path / "run", []))
    with pytest.raises(ValueError, match=r"this model takes \[batch, 1, 8, 8\]"):
        model.embed(torch.zeros(2, 3, 8, 8))

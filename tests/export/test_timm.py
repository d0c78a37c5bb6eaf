"""format=timm: a dense ViT loads into timm.create_model with the same outputs; what cannot map is refused."""

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import ssroute
from ssroute.errors import ConfigError
from ssroute.export.__main__ import export_checkpoint
from tests.conftest import write_checkpoint

timm = pytest.importorskip("timm")  # the [timm] extra; CI installs it with [dev]


def digits(count=7):
    return torch.from_numpy(np.round(load_digits().images[:count] * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_dense_vit_loads_into_timm_with_equal_outputs(tmp_path, activation):
    run = write_checkpoint(tmp_path / "run", [f"model.activation={activation}", "model.mlp_ratio=3.0"])
    folder = export_checkpoint(str(run), str(tmp_path / "timm"), format="timm")
    config = json.loads((folder / "config.json").read_text())
    ours = ssroute.load(run)
    images = digits()
    normalised = ours.normalize(images)
    with torch.no_grad():
        features, tokens = ours.embed(images), ours.tokens(images)
        by_name = timm.create_model(
            config["architecture"], checkpoint_path=str(folder / "model.safetensors"), **config["model_args"]
        ).eval()
        by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        for model in (by_name, by_folder):
            assert (model(normalised) - features).abs().max() < 1e-5
            assert (model.forward_features(normalised) - tokens).abs().max() < 1e-5
    assert features.abs().mean() > 0.1  # the comparison is of real outputs, not of zeros
    data = timm.data.resolve_data_config({}, model=by_folder)
    assert tuple(data["mean"]) == ours.inputs.mean and tuple(data["std"]) == ours.inputs.std and tuple(data["input_size"]) == (1, 8, 8)
    assert by_folder.pretrained_cfg["tag"] == "ssroute" and "license" not in config["pretrained_cfg"]
    assert 'timm.create_model("local-dir:' in (folder / "README.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            ["model.moe_layers=[1]", "model.num_experts=4"],
            r"has mixture-of-experts FFNs in blocks \[1\] \(a timm ViT block has one dense MLP\)",
        ),
        (
            ["patches=entropy_maxsum", "patches.num_patches=8"],
            r"selects them with patches=entropy_maxsum, whose positions come from each patch's continuous centre",
        ),
        (["model=vit_depth", "model.dim=32", "model.depth=2"], r"is model.name=vit_depth \(routing over depth has no timm equivalent\)"),
        (["model.position=rope"], r"needs model.position=absolute, but .* has model.position=rope \(timm's plain ViT has no equivalent\)"),
        (["model.stem=conv"], r"needs model.stem=patch, but .* has model.stem=conv"),
    ],
)
def test_what_timm_cannot_express_is_refused_with_the_reason(tmp_path, overrides, reason):
    run = write_checkpoint(tmp_path / "run", overrides)
    with pytest.raises(ConfigError, match=reason + r".*; export it with format=hub and load it with ssroute.load."):
        export_checkpoint(str(run), str(tmp_path / "timm"), format="timm")
    assert not (tmp_path / "timm").exists()


def test_ssroute_load_points_a_timm_export_to_timm(tmp_path):
    folder = export_checkpoint(str(write_checkpoint(tmp_path / "run", [])), str(tmp_path / "timm"), format="timm")
    with pytest.raises(ConfigError, match=r"is a timm export \(format=timm\); load it with timm.create_model\('local-dir:"):
        ssroute.load(folder)

"""python -m ssroute.export format=hub: the Hub layout, bit-identical reloads without Lightning or Hydra, the card, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

import ssroute
from ssroute.errors import ConfigError
from ssroute.export.__main__ import export_checkpoint, upload
from tests.conftest import write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
ROUTED = ["model.moe_layers=[1]", "model.num_experts=4"]
# every registered router and expert type, a patch selector, routing over depth, rotary positions and the conv stem;
# the default suite runs four of them
VARIANTS = (
    [[*ROUTED, f"router={p.stem}"] for p in sorted((CONFIGS / "router").glob("*.yaml"))]
    + [[*ROUTED, f"experts={p.stem}"] for p in sorted((CONFIGS / "experts").glob("*.yaml"))]
    + [["patches=entropy_maxsum", "patches.num_patches=8"], ["model=vit_depth", "model.dim=32", "model.depth=2"]]
    + [[*ROUTED, "model.position=rope"], [*ROUTED, "model.stem=conv"]]
)
FAST = {"router=token_choice", "router=soft_moe", "patches.num_patches=8", "model.depth=2"}
VARIANTS = [pytest.param(v, id=v[-1], marks=() if v[-1] in FAST else pytest.mark.slow) for v in VARIANTS]


def digits(count=5):
    return torch.from_numpy(np.round(load_digits().images[:count] * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)


def outputs(model, images):
    """embed, tokens and route of one forward each, on a fixed random stream (random routers draw)."""
    found = []
    with torch.no_grad():
        for call in (model.embed, model.tokens, model.route):
            torch.manual_seed(0)
            found.append(call(images))
    routes = {b: (r.experts, r.weights, r.probs, r.centres) for b, r in found[2].items()}
    return found[0], found[1], routes


def assert_identical(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2].keys() == b[2].keys()
    assert all(torch.equal(x, y) for block in a[2] for x, y in zip(a[2][block], b[2][block], strict=True))


@pytest.mark.parametrize("overrides", VARIANTS)
def test_export_reloads_bit_identical_for_every_option(tmp_path, overrides):
    run = write_checkpoint(tmp_path / "run", overrides)
    folder = export_checkpoint(str(run), str(tmp_path / "export"))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    checkpoint, exported = ssroute.load(run), ssroute.load(folder)
    assert_identical(outputs(checkpoint, digits()), outputs(exported, digits()))
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "ssroute" and config["inputs"]["image_size"] == 8 and config["source"] == {"run": "run", "data": "digits"}
    assert {"model", "router", "experts", "patches"} <= set(config)


def test_exported_folder_loads_without_lightning_or_hydra(tmp_path):
    run = write_checkpoint(tmp_path / "run", [*ROUTED, "router.k=2"])
    folder = export_checkpoint(str(run), str(tmp_path / "export"))
    torch.save(digits(), tmp_path / "images.pt")
    script = f"""
import sys
for name in ("pytorch_lightning", "lightning", "hydra", "lightly"):
    sys.modules[name] = None  # any import of these now fails
import torch, ssroute
model = ssroute.load({str(folder)!r})
images = torch.load({str(tmp_path / "images.pt")!r})
with torch.no_grad():
    route = model.route(images)[1]
    torch.save((model.embed(images), model.tokens(images), route.experts, route.weights), {str(tmp_path / "out.pt")!r})
assert not [m for m in sys.modules if m.split(".")[0] in ("pytorch_lightning", "lightning", "hydra", "lightly") and sys.modules[m] is not None]
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True)
    embed, tokens, experts, weights = torch.load(tmp_path / "out.pt")
    model = ssroute.load(run)
    with torch.no_grad():
        route = model.route(digits())[1]
        assert torch.equal(embed, model.embed(digits())) and torch.equal(tokens, model.tokens(digits()))
    assert torch.equal(experts, route.experts) and torch.equal(weights, route.weights)


def test_card_has_the_runs_metrics_routing_budget_and_plots(tmp_path):
    run = write_checkpoint(tmp_path / "run", ROUTED)
    metrics = {"knn_top1": 0.9123, "linear_top1": 0.95, "routing_agreement": 0.647, "routing_agreement_chance": 0.127,
               "block1/routing_agreement": 0.647, "expert_usage_entropy": 0.993, "num_train": 1437, "epochs": 2, "train_time_s": 63.2}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "eval" / "plots").mkdir(parents=True)
    (run / "eval" / "plots" / "routing_maps.png").write_bytes(b"\x89PNG fake")
    folder = export_checkpoint(str(run), str(tmp_path / "export"))
    card = (folder / "README.md").read_text()
    for line in ("| weighted kNN top-1 (k=20, frozen features) | 0.912 |", "| 1 | 0.647 | – | – | – |", "| training images | 1,437 |",
                 "| routing agreement: corresponding patches of two augmented views on the same top-1 expert | 0.647 |",
                 "![routing_maps](plots/routing_maps.png)", f'model = ssroute.load("{folder}")', "library_name: ssroute", "- mixture-of-experts"):  # fmt: skip
        assert line in card, line
    assert "blocks [1] are mixture-of-experts FFNs with 4 mlp experts and a token_choice router" in card
    assert (folder / "plots" / "routing_maps.png").read_bytes() == b"\x89PNG fake"


def test_load_refuses_folders_that_are_not_whole_exports(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"architectures": ["ViTModel"], "model_type": "vit"}))
    with pytest.raises(ConfigError, match="is not an ssroute export"):
        ssroute.load(foreign)
    folder = export_checkpoint(str(write_checkpoint(tmp_path / "run", ROUTED)), str(tmp_path / "export"))
    other = export_checkpoint(str(write_checkpoint(tmp_path / "wide", [*ROUTED, "model.dim=64"])), str(tmp_path / "wide_export"))
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())  # weights of another export
    with pytest.raises(
        ConfigError,
        match=r"model.safetensors does not match its config.json \(.* is \[.*64.*\] in model.safetensors but \[.*32.*\] in the model\)",
    ):
        ssroute.load(folder)
    state = load_file(other / "model.safetensors")
    save_file({k: v for k, v in state.items() if "blocks.1" not in k}, other / "model.safetensors")  # a block's weights lost
    with pytest.raises(ConfigError, match=r"weight\(s\) the model needs are missing, e.g. blocks.1"):
        ssroute.load(other)
    (other / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="cannot be read .* truncated or not a safetensors file"):
        ssroute.load(other)
    (other / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has a config.json but no model.safetensors"):
        ssroute.load(other)


def test_export_refuses_before_writing_anything(tmp_path):
    run = write_checkpoint(tmp_path / "run", ROUTED)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists; pass a new folder"):
        export_checkpoint(str(run), str(tmp_path / "taken"))
    with pytest.raises(ConfigError, match="format=onnx is not an export format; choose hub"):
        export_checkpoint(str(run), str(tmp_path / "out"), format="onnx")
    with pytest.raises(ConfigError, match="format=timm needs a dense ViT, but .* has mixture-of-experts FFNs in blocks \\[1\\]"):
        export_checkpoint(str(run), str(tmp_path / "out"), format="timm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]  # no folder, no staging folder left behind


@pytest.mark.slow
def test_command_exits_2_with_one_sentence_and_writes_nothing(tmp_path):
    run = write_checkpoint(tmp_path / "run", ROUTED)
    done = subprocess.run([sys.executable, "-m", "ssroute.export", f"checkpoint={run}", f"out={tmp_path / 'out'}", "format=timm"],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.strip().startswith("error: format=timm needs a dense ViT") and len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_push_to_hub_uploads_the_written_folder(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")  # the [hub] extra; timm (in [dev]) brings it

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **options):
            calls.append(("create", repo_id, options))

        def upload_folder(self, **options):
            calls.append(("upload", options["repo_id"], sorted(p.name for p in Path(options["folder_path"]).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = export_checkpoint(str(write_checkpoint(tmp_path / "run", ROUTED)), str(tmp_path / "export"), push_to_hub="me/routed-vit")
    upload(folder, "me/routed-vit")
    assert calls == [
        ("create", "me/routed-vit", {"repo_type": "model", "exist_ok": True}),
        ("upload", "me/routed-vit", ["README.md", "config.json", "model.safetensors"]),
    ]

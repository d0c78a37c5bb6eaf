"""``python -m ssroute.compare RUN_A RUN_B``: do two pretrained stacks reach the same conclusion?

Linear CKA (``ssroute.eval.cka``) between the mean-pooled outputs of the same
block of two runs — typically one config trained from two seeds — on the
held-out images of run A's dataset. Writes ``compare/<run B's name>.json``
into run A's folder and prints one line per block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ssroute.checkpoint import load_backbone, load_pretrained, resolve_checkpoint, run_dir_of
from ssroute.data import build_data
from ssroute.data.views import ViewAugment
from ssroute.errors import ConfigError
from ssroute.eval.cka import linear_cka
from ssroute.io import write_json_atomic


@torch.no_grad()
def block_features(run: str, images: torch.Tensor, batch_size: int = 512) -> tuple[list[torch.Tensor], dict]:
    """Mean-pooled output of every block of run ``run`` on uint8 ``images``."""
    config, _ = load_pretrained(run)
    cfg = OmegaConf.create(config)
    data = build_data(cfg.data, cfg.seed)
    backbone, _, _ = load_backbone(run, data)
    normalize = ViewAugment(cfg.data.augment, data.channels, data.image_size, data.mean, data.std).normalize
    parts = [[out.mean(dim=1) for out in backbone(normalize(chunk), keep_blocks=True)[1].block_tokens] for chunk in images.split(batch_size)]
    return [torch.cat(p) for p in zip(*parts, strict=True)], config


def compare(run_a: str, run_b: str, max_images: int = 5000) -> dict[str, float]:
    config_a, _ = load_pretrained(run_a)
    data = build_data(OmegaConf.create(config_a["data"]), config_a["seed"])
    held_out = data.test if data.test is not None else data.train
    images = torch.stack([held_out[i][0] for i in range(min(max_images, len(held_out)))])
    feats_a, _ = block_features(run_a, images)
    feats_b, config_b = block_features(run_b, images)
    if len(feats_a) != len(feats_b):
        raise ConfigError(f"{run_a} has {len(feats_a)} blocks and {run_b} has {len(feats_b)}; compare runs of the same stack.")
    return {f"cka_across_runs/block{i}": linear_cka(a, b) for i, (a, b) in enumerate(zip(feats_a, feats_b, strict=True))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--max-images", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        result = compare(args.run_a, args.run_b, args.max_images)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    folder = run_dir_of(resolve_checkpoint(args.run_a))
    write_json_atomic(folder / "compare" / f"{Path(args.run_b).name}.json", {"run_a": args.run_a, "run_b": args.run_b, **result})
    for key, value in result.items():
        print(f"{key}: {value:.4f}")


if __name__ == "__main__":
    main()

"""Raw-pixel baselines on ssroute's own splits: what a pretrained model must beat.

Runs, on the uint8 pixels scaled to [0, 1]: plain kNN (k=5, Euclidean, as the
usual Fashion-MNIST baseline), ssroute's weighted cosine kNN (k=20, T=0.07, the
protocol behind ``knn_top1``) and ssroute's linear probe (the protocol behind
``linear_top1``).

    python benchmarks/raw_pixel_baselines.py [--datasets digits fashion_mnist] [--train-subset 10000]

``--train-subset N`` adds a row per dataset with the first N training images
(``data.train_subset=N``), the baseline for runs with that budget.

Writes benchmarks/results/raw_pixel_baselines.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from sklearn.neighbors import KNeighborsClassifier

from ssroute.config import DataConfig
from ssroute.data import build_data
from ssroute.eval.knn import knn_accuracy
from ssroute.eval.linear import linear_probe_accuracy

RESULTS = Path(__file__).parent / "results"


def baselines(name: str, train_subset: int | None = None) -> dict[str, float]:
    data = build_data(OmegaConf.structured(DataConfig(name=name, train_subset=train_subset)), seed=0)
    train_x = data.train.images.flatten(1).float() / 255.0
    test_x = data.test.images.flatten(1).float() / 255.0
    train_y, test_y = data.train.labels, data.test.labels
    start = time.perf_counter()
    knn5 = KNeighborsClassifier(n_neighbors=5).fit(train_x.numpy(), train_y.numpy()).score(test_x.numpy(), test_y.numpy())
    return {
        "knn5_euclidean": float(knn5),
        "knn20_weighted_cosine": knn_accuracy(train_x, train_y, test_x, test_y),
        "linear_probe": linear_probe_accuracy(train_x, train_y, test_x, test_y),
        "train_images": len(train_y),
        "test_images": len(test_y),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"])
    parser.add_argument("--train-subset", type=int, default=None, help="also run with only the first N training images")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {name: baselines(name) for name in args.datasets}
    if args.train_subset:
        results.update({f"{name} (first {args.train_subset} train)": baselines(name, args.train_subset) for name in args.datasets})
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads", "command": "python benchmarks/raw_pixel_baselines.py" + (f" --train-subset {args.train_subset}" if args.train_subset else "")}
    (RESULTS / "raw_pixel_baselines.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "# Raw-pixel baselines",
        "",
        f"Command: `{meta['command']}` (splits as in ssroute: digits stratified 80/20 by seed 0; Fashion-MNIST official).",
        "",
        "| dataset | kNN k=5 (Euclidean) | weighted kNN k=20 (cosine, T=0.07) | linear probe |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['knn5_euclidean']:.4f} | {r['knn20_weighted_cosine']:.4f} | {r['linear_probe']:.4f} |")
    (RESULTS / "raw_pixel_baselines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

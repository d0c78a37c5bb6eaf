"""How far ``entropy_maxsum`` is from the exact optimum: brute force on small random images.

For each case (image side, patch side, N; candidates on the stride-1 lattice) it
scores random sparse images by local entropy, finds the best N non-overlapping
patches by exhaustive enumeration, and compares the strip DP, greedy NMS and
their per-image best (what ``entropy_maxsum`` returns) with it. Writes
``benchmarks/results/patch_maxsum_gap.{json,md}``.

    python benchmarks/patch_maxsum_gap.py [--images 200]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssroute.patches.base import overlaps  # noqa: E402
from ssroute.patches.maxsum import EntropyMaxSum, greedy_nms, strip_dp  # noqa: E402

CASES = [(8, 3, 2), (8, 3, 3), (8, 3, 4), (10, 3, 4), (8, 2, 4), (12, 4, 4)]  # (image side, patch side, N)


def brute_force(scores: torch.Tensor, clash: torch.Tensor, num: int) -> torch.Tensor:
    """``[B, K]`` -> ``[B]`` best summed score of ``num`` pairwise non-overlapping candidates (all combinations)."""
    combos = torch.tensor(list(itertools.combinations(range(scores.shape[1]), num)))
    ok = torch.ones(len(combos), dtype=torch.bool)
    for i, j in itertools.combinations(range(num), 2):
        ok &= ~clash[combos[:, i], combos[:, j]]
    combos = combos[ok]
    return torch.cat([chunk[:, combos].sum(-1).amax(dim=1) for chunk in scores.split(16)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for size, patch, num in CASES:
        selector = EntropyMaxSum(patch_size=patch, image_size=size, num_patches=num, stride=1)
        images = torch.rand(args.images, 1, size, size) * (torch.rand(args.images, 1, size, size) > 0.6)
        scores = selector.scores(images)
        optimum = brute_force(scores, overlaps(selector.candidates, selector.candidates, patch), num)
        best = scores.gather(1, selector.select(scores)).sum(1)
        greedy, found = greedy_nms(scores, selector.candidates, num, patch)
        greedy_sum = torch.where(found, scores.gather(1, greedy), float("-inf")).sum(1)
        lattice = scores.view(-1, selector.side, selector.side)[:, torch.arange(selector.strips) * selector.gap]
        picked = strip_dp(lattice, num, selector.gap)
        strip_sum = lattice.flatten(1).gather(1, picked).sum(1)
        ratio = lambda total, optimum=optimum: (total / optimum).clamp(max=1.0)  # noqa: E731
        rows.append(
            {
                "image": size,
                "patch": patch,
                "N": num,
                "candidates": scores.shape[1],
                "images": args.images,
                "maxsum_exact_share": float((best >= optimum - 1e-5).float().mean()),
                "maxsum_mean_ratio": float(ratio(best).mean()),
                "maxsum_min_ratio": float(ratio(best).min()),
                "greedy_exact_share": float((greedy_sum >= optimum - 1e-5).float().mean()),
                "greedy_mean_ratio": float(ratio(greedy_sum).mean()),
                "strip_exact_share": float((strip_sum >= optimum - 1e-5).float().mean()),
                "strip_mean_ratio": float(ratio(strip_sum).mean()),
            }
        )
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "patch_maxsum_gap.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| image | patch | N | candidates | maxsum = optimum | maxsum / optimum mean (min) | greedy = optimum | greedy mean | strip DP = optimum | strip DP mean |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['image']} | {r['patch']} | {r['N']} | {r['candidates']} | {r['maxsum_exact_share']:.0%} | {r['maxsum_mean_ratio']:.4f} ({r['maxsum_min_ratio']:.3f}) "
            f"| {r['greedy_exact_share']:.0%} | {r['greedy_mean_ratio']:.4f} | {r['strip_exact_share']:.0%} | {r['strip_mean_ratio']:.4f} |"
        )
    (out / "patch_maxsum_gap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

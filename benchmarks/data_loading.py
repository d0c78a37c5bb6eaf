"""Start-up and read speed of big image folders and WebDataset shards (target: training starts within 30 s).

Generates two unlabelled folders and one set of shards (once; kept under ``--root``,
which is git-ignored by default): 100,000 16x16 grey PNGs, 20,000 256x256 RGB JPEGs,
and 100,000 16x16 grey PNGs in WebDataset tar shards of 10,000 with a ``sizes.json``
(``data=webdataset``), each with a few corrupt images mixed in. For each it measures

- **start-up**: how long until training starts (the imports, timed alone, plus the
  run log's span from the run's start to the first epoch), and the wall time of ``python -m pretrain data=image_folder
  data.root=FOLDER`` for a one-step run (``trainer.limit_train_batches=1``,
  no monitor, ``evaluate=false``, the dense ``model=vit_tiny``), as a user
  would see it: imports, listing, the statistics sample, the model, the first
  batch decoded in the loader's workers, one step and the end of the run;
- **images/s** of the training loader alone (``ResumableLoader``, or ``ShardLoader``
  for shards, with ``data.num_workers`` resolved as in training) over ``--batches``
  batches: for folders the first pass decodes and the second reads the shared cache
  (small images); shards are decoded on every pass (epochs 0 and 1).

    python benchmarks/data_loading.py --threads 2
    python benchmarks/data_loading.py --threads 1 --small 20000 --photos 5000   # a quicker, smaller run
    python benchmarks/data_loading.py --threads 1 --only shards   # the shards alone; the folders' rows are kept from the last run

Writes ``benchmarks/results/data_loading.json`` and ``benchmarks/results/data_loading.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from report import machine, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
TARGET_S = 30.0
BAD_FILES = 5  # corrupt files mixed into each folder (within the default data.max_bad_fraction)


def generate(folder: Path, count: int, size: int, mode: str, suffix: str) -> float:
    """Write ``count`` random images (and a few corrupt files) into ``folder`` unless it is complete; seconds spent."""
    from PIL import Image

    marker = folder / ".complete"
    if marker.exists():
        return 0.0
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    base = rng.integers(0, 256, shape, dtype=np.uint8)
    for i in range(count):
        shift = rng.integers(0, size)
        Image.fromarray(np.roll(base, shift, axis=1), mode=mode).save(folder / f"{i:06d}{suffix}", quality=90)
    for i in range(BAD_FILES):
        (folder / f"{i * (count // BAD_FILES):06d}b{suffix}").write_bytes(b"not an image")
    marker.write_text("")
    return time.perf_counter() - start


def generate_shards(folder: Path, count: int, per_shard: int, size: int = 16) -> float:
    """Write ``count`` random grey PNGs (a few of them corrupt) into tar shards and a sizes.json unless complete; seconds spent."""
    import io

    from PIL import Image

    from ssroute.data.shards import write_shards

    marker = folder / ".complete"
    if marker.exists():
        return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size), dtype=np.uint8)
    samples = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.roll(base, rng.integers(0, size), axis=1), mode="L").save(buffer, format="PNG")
        samples.append((buffer.getvalue() if i % (count // BAD_FILES) != count // BAD_FILES - 1 else b"not an image", None))
    write_shards(folder, samples, per_shard, prefix="train")
    marker.write_text("")
    return time.perf_counter() - start


def shard_urls(folder: Path) -> str:
    shards = sorted(folder.glob("train-*.tar"))
    return f"{folder}/train-{{000000..{len(shards) - 1:06d}}}.tar"


def startup(data: list[str], threads: int, workdir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    overrides = [
        *data,
        "model=vit_tiny",
        "schedule=end_to_end",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.knn_every_n_epochs=0",
        "trainer.fluctuation_every_n_steps=0",
        "trainer.progress_bar=false",
        f"trainer.threads={threads}",
        "evaluate=false",
        f"hydra.run.dir={workdir}",
    ]
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run folder: its log must hold this run alone
    start = time.perf_counter()
    imports = "import pretrain.__main__, ssroute.train.pretrain"  # what the entry point imports before the run starts
    subprocess.run([sys.executable, "-c", imports], cwd=ROOT, env=env, check=True, capture_output=True)
    imports = time.perf_counter() - start  # the same imports and nothing else: what every run pays before reading data
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pretrain", *overrides], cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    metrics = json.loads((workdir / "metrics.json").read_text())
    return {
        "one_step_run_s": round(wall, 1),
        "imports_s": round(imports, 1),
        "run_start_to_first_step_s": round(_log_span(workdir / "__main__.log", "intra-op threads", "schedule "), 1),
        "train_time_s": metrics["train_time_s"],
        "unreadable_images": metrics.get("unreadable_images"),
    }


def _log_span(log: Path, first: str, last: str) -> float:
    """Seconds between the run log's first line containing ``first`` (run_pretrain starts: threads set) and the
    first containing ``last`` (the first training epoch starts: listing, statistics, model and trainer are done)."""
    from datetime import datetime

    stamps = {}
    for line in log.read_text().splitlines():
        for key in (first, last):
            if key in line and key not in stamps:
                stamps[key] = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    return (stamps[last] - stamps[first]).total_seconds()


def shard_read_speed(folder: Path, batches: int, batch_size: int) -> dict:
    from omegaconf import OmegaConf

    from ssroute.config import DataConfig
    from ssroute.data import build_data
    from ssroute.data.loader import loader_workers
    from ssroute.data.shard_loader import ShardLoader

    start = time.perf_counter()
    bundle = build_data(OmegaConf.structured(DataConfig(name="webdataset", urls=shard_urls(folder), batch_size=batch_size)), seed=0)
    build_s = time.perf_counter() - start
    workers = loader_workers(None, bundle.stream)
    loader = ShardLoader(bundle.stream, batch_size=batch_size, seed=0, num_workers=workers)
    passes = []
    for epoch in range(2):
        iterator = iter(loader)
        loader.epochs.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for i, batch in enumerate(iterator):
            images += batch[0].shape[0]
            if i + 1 == batches:
                break
        passes.append(round(images / (time.perf_counter() - start), 1))
        del iterator
    return {
        "files": bundle.train_count,
        "shards": len(bundle.stream.index.urls),
        "lazy": True,
        "build_data_s": round(build_s, 2),
        "num_workers": max(1, loader.num_workers),
        "cached": False,
        "images_per_s_first_pass": passes[0],
        "images_per_s_second_pass": passes[1],
    }


def read_speed(folder: Path, batches: int, batch_size: int) -> dict:
    from omegaconf import OmegaConf

    from ssroute.config import DataConfig
    from ssroute.data import build_data
    from ssroute.data.loader import ResumableLoader, loader_workers

    start = time.perf_counter()
    bundle = build_data(OmegaConf.structured(DataConfig(name="image_folder", root=str(folder))), seed=0)
    build_s = time.perf_counter() - start
    workers = loader_workers(None, bundle.train)
    loader = ResumableLoader(bundle.train, batch_size=batch_size, seed=0, num_workers=workers)
    passes = []
    for _ in range(2):
        start, images = time.perf_counter(), 0
        for i, batch in enumerate(loader):
            images += batch[0].shape[0]
            if i + 1 == batches:
                break
        passes.append(round(images / (time.perf_counter() - start), 1))
        loader.epoch_sampler.set_epoch(0)  # the same images again: the second pass reads the cache where it fits
    return {
        "files": len(bundle.reader.files) if bundle.reader else len(bundle.train),
        "lazy": bundle.reader is not None,
        "build_data_s": round(build_s, 2),
        "num_workers": workers,
        "cached": bool(bundle.reader is not None and bundle.reader.cache is not None),
        "images_per_s_first_pass": passes[0],
        "images_per_s_second_pass": passes[1],
    }


def markdown(report: dict) -> str:
    notes: list[str] = []
    lines = [
        "# Big image folders and WebDataset shards: start-up and read speed",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores, shared with other jobs: 1-min load average "
        f"{report['loadavg_1min_before_after'][0]:.2f} -> {report['loadavg_1min_before_after'][1]:.2f}), torch {report['machine']['torch']}, "
        f"{report['threads']} intra-op thread(s). Each folder holds {BAD_FILES} corrupt files. One-step run = the wall time of "
        "`python -m pretrain data=image_folder data.root=FOLDER` for one training step (imports, listing, statistics sample, model, "
        "first batch, the step, the end of the run); imports = `python -c 'import pretrain.__main__, ssroute.train.pretrain'` alone; run start to first step = "
        "from the run log's first line (threads set) to the first epoch's start (listing, statistics sample, model, trainer); "
        "the target (<= 30 s) is checked on imports + run start to first step; images/s = the training loader alone, first pass (decode) and second pass "
        f"(shared cache where the folder fits), over {report['batches']} batches of {report['batch_size']}.",
        "",
        "| folder | files | build data s | imports s | run start to first step s | imports + that | <= 30 s | one-step run s | one step s "
        "| workers | images/s 1st pass | images/s 2nd pass | unreadable found |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["results"].items():
        if "command" in r:
            notes.append(
                f"{name}: command `{r['command']}`, 1-min load average {r['loadavg_1min_before_after'][0]:.2f} -> {r['loadavg_1min_before_after'][1]:.2f}."
            )
        first_step = r["imports_s"] + r["run_start_to_first_step_s"]
        ok = "yes" if first_step <= TARGET_S else "no"
        lines.append(
            f"| {name} | {r['files']:,} | {r['build_data_s']:.1f} | {r['imports_s']:.1f} | {r['run_start_to_first_step_s']:.1f} | "
            f"{first_step:.1f} | {ok} | {r['one_step_run_s']:.1f} | {r['train_time_s']:.1f} | {r['num_workers']} | "
            f"{r['images_per_s_first_pass']:,.0f} | {r['images_per_s_second_pass']:,.0f} | {r['unreadable_images']} |"
        )
    shard_note = (
        "Shards: files = samples; start-up counts them from the sizes.json beside the shards and decodes the first "
        "data.probe_images samples for the probes and statistics; every pass decodes (epochs 0 and 1), the unreadable "
        "count is what the one-step run met."
    )
    return "\n".join([*lines, "", *notes, *([shard_note] if any("shards" in r for r in report["results"].values()) else [])]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of the training process (trainer.threads)")
    parser.add_argument("--small", type=int, default=100_000, help="16x16 PNGs to generate")
    parser.add_argument("--photos", type=int, default=20_000, help="256x256 JPEGs to generate")
    parser.add_argument("--shards", type=int, default=100_000, help="16x16 PNGs to write into WebDataset shards")
    parser.add_argument("--per-shard", type=int, default=10_000, help="samples per shard")
    parser.add_argument(
        "--only", choices=("all", "folders", "shards"), default="all", help="measure these; keep the other rows of the last results"
    )
    parser.add_argument("--batches", type=int, default=20, help="batches timed per pass of the read-speed measurement")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "data_loading", help="where the folders are generated (git-ignored)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    folders = {
        f"{args.small:,} x 16x16 PNG": (args.root / f"png16_{args.small}", args.small, 16, "L", ".png"),
        f"{args.photos:,} x 256x256 JPEG": (args.root / f"jpeg256_{args.photos}", args.photos, 256, "RGB", ".jpg"),
    }
    shards = {
        f"{args.shards:,} x 16x16 PNG in WebDataset shards of {args.per_shard:,}": (
            args.root / f"shards16_{args.shards}_{args.per_shard}",
            args.shards,
            args.per_shard,
        )
    }
    folders = {} if args.only == "shards" else folders
    shards = {} if args.only == "folders" else shards
    load_before = os.getloadavg()[0]
    results = {}
    for name, (folder, count, size, mode, suffix) in folders.items():
        made = generate(folder, count, size, mode, suffix)
        print(f"{name}: generated in {made:.0f} s" if made else f"{name}: already generated", flush=True)
        run_dir = args.root / "runs" / folder.name
        data = ["data=image_folder", f"data.root={folder}"]
        results[name] = {**startup(data, args.threads, run_dir), **read_speed(folder, args.batches, args.batch_size)}
        print(name, results[name], flush=True)
    for name, (folder, count, per_shard) in shards.items():
        made = generate_shards(folder, count, per_shard)
        print(f"{name}: generated in {made:.0f} s" if made else f"{name}: already generated", flush=True)
        data = ["data=webdataset", f"data.urls='{shard_urls(folder)}'"]
        results[name] = {
            **startup(data, args.threads, args.root / "runs" / folder.name),
            **shard_read_speed(folder, args.batches, args.batch_size),
        }
        print(name, results[name], flush=True)
    report = {
        "command": "python benchmarks/data_loading.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "machine": machine(),
        "threads": args.threads,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "results": results,
    }
    previous = args.out / "data_loading.json"
    if args.only != "all" and previous.exists():  # the rows not measured now keep their numbers and their command
        kept = json.loads(previous.read_text())
        for row in results.values():
            row["command"], row["loadavg_1min_before_after"] = report["command"], report["loadavg_1min_before_after"]
        report = {**kept, "results": {**kept["results"], **results}}
    write_results(args.out, "data_loading", report, markdown(report))


if __name__ == "__main__":
    main()

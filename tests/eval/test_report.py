"""report.md: a pure function of metrics, plots and config."""

from __future__ import annotations

from ssroute.eval.report import render_report

PRETRAIN = {
    "model": {"stack": ["ssl", "route", "ssl"], "depth": 3, "moe_layers": [1], "num_experts": 4, "dim": 32, "patch_size": 2},
    "router": {"name": "token_choice"},
    "experts": {"name": "mlp"},
    "ssl": {"name": "simclr"},
    "schedule": {"name": "layerwise"},
    "trainer": {"max_epochs": 30},
    "data": {"name": "digits", "batch_size": 256},
    "optim": {"lr": 0.001},
}
METRICS = {
    "data": "digits",
    "num_train": 1437,
    "num_test": 360,
    "knn_top1": 0.9,
    "linear_top1": 0.95,
    "fewshot/1shot_top1": 0.5,
    "fewshot/1shot_top1_std": 0.04,
    "fewshot/10shot_top1": 0.8,
    "fewshot/10shot_top1_std": 0.01,
    "retrieval/precision_at_1": 0.91,
    "retrieval/map_at_r": 0.42,
    "block0/knn_top1": 0.6,
    "block0/linear_top1": 0.7,
    "block1/knn_top1": 0.8,
    "block1/linear_top1": 0.85,
    "block1/routing_agreement": 0.75,
    "block1/family/crop/routing_agreement": 0.6,
    "block1/strength/0.5/routing_agreement": 0.9,
    "block1/strength/2/routing_agreement": 0.4,
    "routing_agreement": 0.75,
    "family/crop/in_run": 1.0,
    "eval_time_s": 12.5,
}


def test_header_tables_and_every_plot():
    text = render_report(
        METRICS, ["plots/usage.png", "plots/routing_maps.png"], PRETRAIN, run="runs/pretrain/x", skipped={"plots": "no matplotlib"}
    )
    lines = text.splitlines()
    assert lines[0] == "# Evaluation of runs/pretrain/x"
    assert "| stack | ssl → route → ssl, dim 32, patch 2 |" in lines
    assert "| router | token_choice |" in lines and "| experts | 4 × mlp |" in lines
    assert "| training | ssl simclr, schedule layerwise |" in lines
    assert "| budget | 30 epochs, batch 256, lr 0.001 |" in lines
    assert "| data | digits (1437 train / 360 test images) |" in lines
    assert "Skipped: plots (no matplotlib)." in lines
    assert "| kNN (k=20, T=0.07) | 0.900 |" in lines
    assert "| 1-shot nearest class mean | 0.500 ± 0.040 |" in lines
    assert lines.index("| 1-shot nearest class mean | 0.500 ± 0.040 |") < lines.index("| 10-shot nearest class mean | 0.800 ± 0.010 |")
    assert "| retrieval MAP@R | 0.420 |" in lines
    assert "| 0 | dense | 0.600 | 0.700 |" in lines and "| 1 | MoE | 0.800 | 0.850 |" in lines
    assert "| 1 | 0.750 |" in lines and "| all | 0.750 |" in lines  # per block and the mean over blocks
    assert "| block | 0.5 | 2 |" in lines  # strengths sorted as numbers
    assert "| in the run's augmentation | yes |" in lines
    assert "| eval_time_s | 12.500 |" in lines
    assert "| routing_agreement | 0.750 |" not in lines  # the mean sits in the routing table, not in "other"
    assert "![usage](plots/usage.png)" in lines and "![routing_maps](plots/routing_maps.png)" in lines


def test_dense_finetuned_unlabelled_report_has_no_empty_sections():
    finetune = {
        "model": {"depth": 2, "moe_layers": [], "dim": 32},
        "mode": "linear",
        "labels_fraction": 0.1,
        "checkpoint": "runs/pretrain/x",
    }
    text = render_report({"eval_time_s": 1.0}, [], finetune, run="runs/finetune/y")
    assert "## Labelled protocols" not in text and "## Per-block probes" not in text and "## Routing" not in text and "## Plots" not in text
    assert "| training | fine-tuned (linear, labels_fraction 0.1) from runs/pretrain/x |" in text
    assert "| router | – (dense) |" in text

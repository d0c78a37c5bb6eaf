"""Every registered option completes a whole run: pretrain -> end-of-run evaluation -> fine-tune -> python -m ssroute.evaluate.

One tiny run per patch selector, router, expert type, SSL objective, schedule and model config, so no
registered option can fail at the end of a run again (the end-of-run evaluation is where the last one did).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssroute.experts import EXPERTS
from ssroute.objectives import OBJECTIVES
from ssroute.patches import PATCH_SELECTORS
from ssroute.routing import ROUTERS
from ssroute.train.schedule import SCHEDULES
from tests.conftest import compose_config

pytestmark = pytest.mark.slow

MODELS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "model").glob("*.yaml"))
ROUTED = ["model.moe_layers=[1]", "model.num_experts=4"]
EVALUATION = ["evaluation.max_routing_images=32", "evaluation.stability_strengths=[1.0]", "evaluation.fewshot_shots=[1]",
              "evaluation.fewshot_draws=1", "evaluation.block_linear=false"]  # fmt: skip
BUDGET = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "data.train_subset=128", "data.batch_size=64", "evaluate=true",
          "trainer.fluctuation_every_n_steps=1", *EVALUATION]  # fmt: skip

CASES = (
    [(f"patches={n}", [f"patches={n}", *([] if n == "grid" else ["patches.num_patches=9"]), *ROUTED]) for n in PATCH_SELECTORS.names()]
    + [(f"router={n}", [f"router={n}", *ROUTED]) for n in ROUTERS.names()]
    + [(f"experts={n}", [f"experts={n}", *ROUTED]) for n in EXPERTS.names()]
    + [(f"ssl={n}", [f"ssl={n}", *ROUTED]) for n in OBJECTIVES.names()]
    + [(f"schedule={n}", [f"schedule={n}", "model.stack=[ssl,route,ssl]", "model.num_experts=4"]) for n in SCHEDULES]
    + [(f"model={n}", [f"model={n}", "model.dim=32", "model.heads=2"]) for n in MODELS]
    + [
        (f"model.position={p} model.stem={s}", [f"model.position={p}", f"model.stem={s}", *ROUTED])
        for p in ("absolute", "rope")
        for s in ("patch", "conv")
    ]
    + [
        (
            "dense, soft partners, routing teacher, cosine gate, router context, groups",
            [
                "model.stack=[ssl,route,ssl]",
                "schedule=layerwise",
                "model.num_experts=4",
                "dense.weight=1",
                "consistency.partners=soft",
                "consistency.teacher_momentum=0.99",
                "router.cosine_scale=10",
                "model.router_context=0.5",
                "model.group_images=2",
            ],
        ),  # fmt: skip
        ("consistency.loss=mutual_information", ["consistency.loss=mutual_information", *ROUTED]),
        ("router.random_fraction=0.5", ["router.random_fraction=0.5", *ROUTED]),
        (
            "vit_depth per token, gru router",
            [
                "model=vit_depth",
                "model.dim=32",
                "model.heads=2",
                "model.depth_router.per_token=true",
                "model.depth_router.kind=gru",
                "model.depth_router.step_input=scalar",
            ],
        ),
    ]
)


@pytest.mark.parametrize("overrides", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_a_whole_run(tmp_path, pretrain_cfg, overrides):
    from ssroute.evaluate import evaluate_checkpoint
    from ssroute.train.finetune import run_finetune
    from ssroute.train.pretrain import run_pretrain

    run = run_pretrain(pretrain_cfg([*BUDGET, *overrides]), tmp_path / "pre")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["knn_top1"] > 0.1 and (run / "eval" / "report.md").is_file()  # above chance (0.1) after one step
    routed = metrics["moe_layers"] > 0
    assert routed == ("routing_agreement" in metrics) and routed == (
        "routing_shift_content" in metrics or "routing_position_nmi" in metrics
    )

    tuned = compose_config("finetune", [f"checkpoint={run}", "trainer.progress_bar=false", *BUDGET])
    out = run_finetune(tuned, tmp_path / "ft", overrides=[f"checkpoint={run}"])
    assert "test_top1" in json.loads((out / "metrics.json").read_text()) and (out / "eval" / "report.md").is_file()

    command = [f"checkpoint={run}", f"out={tmp_path / 'again'}", *(o.split(".", 1)[1] for o in EVALUATION)]
    again = evaluate_checkpoint(compose_config("evaluate", command), command)
    assert again.metrics["knn_top1"] == metrics["knn_top1"]  # the command measures what the run's end did

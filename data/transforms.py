"""Image decoding and the train/eval transforms.

This module owns how encoded image bytes become a normalised float tensor:
`decode_image` (bytes -> PIL image in the configured colour mode) and
`build_transform` (PIL image -> [C, H, W] float32 tensor). The random
augmentations draw from torch's global RNG; data.stream seeds that RNG per
batch so augmentation is reproducible and resumable.

Transform families (data.transform):
  - "digits" (default): square resize; train adds a small rotation and
    translation (no flips: a mirrored digit is another or no digit).
  - "imagenet": the ViT / Hyp-ViT / CHEST recipe. Train: RandomResizedCrop
    (image_size, bicubic) + RandomHorizontalFlip; eval: Resize(shorter side
    to int(image_size * 256 / 224), bicubic) + CenterCrop(image_size).
  - "faces": aligned face crops (112 x 112 for ArcFace-style data). Train:
    RandomHorizontalFlip; eval: nothing. Both resize to image_size square,
    which is a plain copy when the crops already have that size.
With data.augment=false the train transform equals the eval transform.
Normalisation (data.norm): "scalar" = data.mean/data.std on every channel;
"imagenet" = timm's IMAGENET_DEFAULT_MEAN/STD; "inception" = 0.5/0.5.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from data.config import DataConfig

# Per-channel (mean, std) presets of data.norm; literal copies of timm's
# IMAGENET_DEFAULT_MEAN/STD and IMAGENET_INCEPTION_MEAN/STD, so data does
# not import timm (a model-side dependency) just for six numbers.
NORM_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# PIL mode per data.in_chans.
_MODES: dict[int, str] = {1: "L", 3: "RGB"}

# Light augmentation for small digit-like images: a few degrees of rotation
# and up to 10% translation. No flips (a mirrored 2 is not a 2) and no
# colour jitter (grayscale strokes).
_ROTATE_DEGREES = 10.0
_TRANSLATE = (0.1, 0.1)


def pil_mode(in_chans: int) -> str:
    """PIL mode for a channel count; ValueError names data.in_chans."""
    try:
        return _MODES[in_chans]
    except KeyError:
        raise ValueError(f"data.in_chans={in_chans!r} is not supported; use 1 or 3") from None


def check_image_header(data: bytes) -> None:
    """Cheap validity check of encoded image bytes, without decoding pixels.

    Parses the header and, for PNG, walks the chunks and checks their CRCs
    (PIL's verify()); no zlib/JPEG decoding happens. Raises on garbage or a
    truncated PNG. data.stream runs this on every raw sample, including the
    ones it skips on resume, so it must stay much cheaper than a decode.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.verify()


def decode_image(data: bytes, in_chans: int) -> Image.Image:
    """Decode image bytes into a fully loaded PIL image of mode L or RGB."""
    with Image.open(io.BytesIO(data)) as img:
        # convert() forces the full decode inside the `with`, so a corrupt
        # body raises here and not later inside the transform.
        return img.convert(pil_mode(in_chans))


def normalisation(cfg: DataConfig) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) lists for data.norm / data.mean / data.std."""
    if cfg.norm == "scalar":
        return [cfg.mean] * cfg.in_chans, [cfg.std] * cfg.in_chans
    try:
        mean, std = NORM_PRESETS[cfg.norm]
    except KeyError:
        raise ValueError(
            f"data.norm={cfg.norm!r} is unknown; choose scalar, {', '.join(NORM_PRESETS)}"
        ) from None
    if cfg.in_chans != len(mean):
        raise ValueError(f"data.norm={cfg.norm} needs data.in_chans={len(mean)}")
    return list(mean), list(std)


def _geometry(cfg: DataConfig, train: bool) -> list[Callable]:
    """The PIL-side steps of the non-digit families (before ToTensor)."""
    size = cfg.image_size
    bicubic = T.InterpolationMode.BICUBIC
    if cfg.transform == "imagenet":
        if train:
            return [T.RandomResizedCrop(size, interpolation=bicubic), T.RandomHorizontalFlip()]
        # 256/224 is the usual centre-crop ratio; int() matches timm/torchvision.
        return [T.Resize(int(size * 256 / 224), interpolation=bicubic), T.CenterCrop(size)]
    if cfg.transform == "faces":
        # Aligned crops are already the right size: the resize is then a copy.
        steps: list[Callable] = [T.Resize((size, size), interpolation=bicubic)]
        return steps + [T.RandomHorizontalFlip()] if train else steps
    raise ValueError(
        f"data.transform={cfg.transform!r} is unknown; choose digits, imagenet or faces"
    )


def build_transform(cfg: DataConfig, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """Return PIL image -> normalised [in_chans, image_size, image_size] tensor.

    See the module docstring for the families. For "digits", train with
    data.augment adds a small random rotation/translation; its resize
    always targets a square (a PIL resize to the current size is a copy).
    """
    pil_mode(cfg.in_chans)
    mean, std = normalisation(cfg)
    if cfg.transform != "digits":
        return T.Compose(
            _geometry(cfg, train and cfg.augment) + [T.ToTensor(), T.Normalize(mean, std)]
        )
    steps: list[Callable] = [
        T.Resize((cfg.image_size, cfg.image_size), antialias=True),
    ]
    if train and cfg.augment:
        steps.append(T.RandomAffine(degrees=_ROTATE_DEGREES, translate=_TRANSLATE, fill=0))
    steps += [
        T.ToTensor(),
        T.Normalize(mean, std),
    ]
    return T.Compose(steps)

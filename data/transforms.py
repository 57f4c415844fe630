"""Image decoding and the train/eval transforms.

This module owns how encoded image bytes become the model's input:
`decode_image` / `open_image` (bytes -> PIL image in the configured colour
mode), `build_transform` (PIL image -> [C, H, W] tensor: uint8 pixels with
data.uint8_batches, the default, else normalised float32) and
`InputNormaliser` (a batch of either -> normalised, on the training device).
The random augmentations draw from torch's global RNG; data.stream seeds that
RNG per batch so augmentation is reproducible and resumable.

Transform families (data.transform):
  - "digits" (default): square resize; train adds a small rotation and
    translation (no flips: a mirrored digit is another or no digit); plain
    torchvision.
  - "imagenet": the ViT / Hyp-ViT / CHEST recipe. Train: RandomResizedCrop
    (image_size, bicubic) + RandomHorizontalFlip; eval: Resize(shorter side
    to int(image_size * 256 / 224), bicubic) + CenterCrop(image_size).
  - "faces": aligned face crops (112 x 112 for ArcFace-style data). Train:
    RandomHorizontalFlip; eval: nothing. Both resize to image_size square,
    which is skipped when the crops already have that size.
The last two live in data.crops (same torch RNG draws as torchvision,
data.resize_backend, draft-mode JPEG decoding). With data.augment=false the
train transform equals the eval transform.
Normalisation (data.norm): "scalar" = data.mean/data.std on every channel;
"imagenet" = timm's IMAGENET_DEFAULT_MEAN/STD; "inception" = 0.5/0.5.
decode_image does not copy an image already in the wanted mode (PIL's
convert() to the same mode is a full copy).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, JpegImagePlugin
from torchvision import transforms as T

from data.config import NORM_PRESETS, DataConfig
from data.crops import crop_transform, eval_shorter_side


# SOI marker and the first byte of the next marker.
_JPEG_START = b"\xff\xd8\xff"
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

    A JPEG is only checked for its start-of-image marker: parsing its header
    here would cost as much again as the decoder's own parse (about 18 us,
    2% of a 224 px sample), and a JPEG damaged past its first bytes fails in
    the decode instead, where it is counted and its place refilled. Other
    formats are opened and, for PNG, their chunks walked with their CRCs
    checked (PIL's verify(); no zlib decoding). Raises on garbage or a
    truncated PNG. data.stream runs this on every raw sample, including the
    ones it skips on resume, so it must stay much cheaper than a decode.
    """
    if data[:3] == _JPEG_START:
        return
    with Image.open(io.BytesIO(data)) as img:
        img.verify()


def decode_image(data: bytes, in_chans: int) -> Image.Image:
    """Decode image bytes into a fully loaded PIL image of mode L or RGB.

    The full decode happens here, so a corrupt body raises in the caller's
    try (data.stream.decode_batch) and not later inside the transform.
    """
    return to_mode(Image.open(io.BytesIO(data)), in_chans)


def _load(img: Image.Image, mode: str) -> Image.Image:
    """Decode an opened image into `mode`, without a copy if it has that mode."""
    if img.mode == mode:
        # convert() to the same mode would decode and then copy the pixels.
        img.load()
        return img
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grayscale: PIL's convert clips at 255, not scales
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) >> 8, 0, 255).astype(np.uint8))
    return img.convert(mode)


def to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """An opened image in the mode training decodes to (16-bit grayscale scaled down, not clipped at 255)."""
    return _load(img, pil_mode(in_chans))


def open_image(data: bytes, in_chans: int) -> Image.Image:
    """Like decode_image, but a JPEG already in the wanted mode stays undecoded.

    Only the header is parsed here; the train "imagenet" transform then
    decodes the pixels, at a reduced DCT scale when its random crop allows
    (see the module docstring). Decode errors of such an image therefore
    surface in the transform call, not here: callers must catch them there.
    Other images (PNG, or a JPEG needing a mode conversion) are decoded here.
    """
    mode = pil_mode(in_chans)
    img = Image.open(io.BytesIO(data))
    if isinstance(img, JpegImagePlugin.JpegImageFile) and img.mode == mode:
        return img
    return _load(img, mode)


def normalisation(cfg: DataConfig) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) lists for data.norm / data.mean / data.std / data.channel_*."""
    if cfg.norm == "scalar":
        return [cfg.mean] * cfg.in_chans, [cfg.std] * cfg.in_chans
    if cfg.norm == "channels":
        return cfg.channel_values()
    if cfg.norm == "timm":
        raise ValueError(
            "data.norm=timm is resolved from model.name when the run starts "
            "(train.config.RunConfig.resolved); outside a run set data.norm to its values"
        )
    try:
        mean, std = NORM_PRESETS[cfg.norm]
    except KeyError:
        raise ValueError(f"data.norm={cfg.norm!r} is unknown; choose scalar, {', '.join(NORM_PRESETS)}") from None
    if cfg.in_chans != len(mean):
        raise ValueError(f"data.norm={cfg.norm} needs data.in_chans={len(mean)}")
    return list(mean), list(std)


class InputNormaliser:
    """A loader's image batch -> the model's input: on `device`, in `dtype`, normalised.

    With data.uint8_batches the loaders yield raw uint8 pixels and the
    normalisation (x / 255 - mean) / std runs here, on the training device,
    after the copy (as timm's PrefetchLoader does): a quarter of the bytes go
    through the data workers' shared memory and to the GPU, and the float
    passes run on the device instead of in the workers. The arithmetic is the
    per-image path's float32 division, subtraction and division, so on CPU the
    result is bit-identical to data.uint8_batches=false (on CUDA a division by
    a scalar is a multiplication by its reciprocal: within 1 ulp). Float
    batches are only moved and cast.
    """

    def __init__(self, cfg: DataConfig) -> None:
        mean, std = normalisation(cfg)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images.to(device, dtype, non_blocking=True)
        if self.mean.device != torch.device(device):
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        x = images.to(device, non_blocking=True).to(torch.float32).div_(255).sub_(self.mean).div_(self.std)
        return x.to(dtype)


def eval_preprocessing(cfg: DataConfig) -> dict[str, Any]:
    """The evaluation transform's geometry in words another program can follow (export.json): "imagenet"
    resizes the shorter side (bicubic) and centre-crops a square; "faces" and "digits" resize to the square."""
    size = cfg.image_size
    if cfg.transform == "imagenet":
        return {"resize_shorter_side": eval_shorter_side(size), "center_crop": size, "interpolation": "bicubic"}
    interpolation = "bicubic" if cfg.transform == "faces" else "bilinear"  # digits: torchvision Resize's default
    return {"resize": [size, size], "center_crop": None, "interpolation": interpolation}


def build_transform(cfg: DataConfig, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """Return PIL image -> [in_chans, image_size, image_size] tensor.

    The tensor holds uint8 pixels with data.uint8_batches (InputNormaliser
    normalises them on the device), else normalised float32 values.
    See the module docstring for the families. For "digits", train with
    data.augment adds a small random rotation/translation; its resize
    always targets a square (a PIL resize to the current size is a copy).
    """
    pil_mode(cfg.in_chans)
    mean, std = normalisation(cfg)
    if cfg.transform != "digits":
        return crop_transform(cfg, train and cfg.augment, mean, std)
    steps: list[Callable] = [
        T.Resize((cfg.image_size, cfg.image_size), antialias=True),
    ]
    if train and cfg.augment:
        steps.append(T.RandomAffine(degrees=_ROTATE_DEGREES, translate=_TRANSLATE, fill=0))
    # uint8: normalised later, on the device (InputNormaliser)
    steps += [T.PILToTensor()] if cfg.uint8_batches else [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)

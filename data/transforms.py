"""Image decoding and the train/eval transforms.

This module owns how encoded image bytes become a normalised float tensor:
`decode_image` (bytes -> PIL image in the configured colour mode) and
`build_transform` (PIL image -> [C, H, W] float32 tensor). The random
augmentations draw from torch's global RNG; data.stream seeds that RNG per
batch so augmentation is reproducible and resumable.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from data.config import DataConfig

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


def build_transform(cfg: DataConfig, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """Return PIL image -> normalised [in_chans, image_size, image_size] tensor.

    Train with data.augment adds a small random rotation/translation. Resize
    always targets a square: a PIL resize to the current size is a copy, so
    it costs nothing when the shards already have the right size.
    """
    pil_mode(cfg.in_chans)
    steps: list[Callable] = [
        T.Resize((cfg.image_size, cfg.image_size), antialias=True),
    ]
    if train and cfg.augment:
        steps.append(T.RandomAffine(degrees=_ROTATE_DEGREES, translate=_TRANSLATE, fill=0))
    steps += [
        T.ToTensor(),
        T.Normalize([cfg.mean] * cfg.in_chans, [cfg.std] * cfg.in_chans),
    ]
    return T.Compose(steps)

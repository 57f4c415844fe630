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

Speed (the "imagenet" and "faces" families; "digits" is plain torchvision):
the outputs are bit-for-bit those of the torchvision recipe above
(RandomResizedCrop / RandomHorizontalFlip / Resize / CenterCrop, then
ToTensor + Normalize), with the same torch RNG draws in the same order, but
  - decode_image does not copy an image already in the wanted mode (PIL's
    convert() to the same mode is a full copy);
  - the uint8 -> normalised float conversion is one strided uint8 -> float32
    copy into the output (the flip is a negative stride in it) plus three
    in-place passes, instead of the flip's, ToTensor's and Normalize's
    extra copies (array copy, contiguous permute, float cast, clone);
  - train "imagenet" given a not-yet-decoded JPEG (open_image) decodes it at a
    reduced DCT scale (PIL draft mode, 1/2, 1/4 or 1/8) when the random crop,
    drawn first from the header size in original pixel coordinates, still
    spans >= image_size pixels on both sides at that scale; the crop box is
    then mapped to draft coordinates, so the crop distribution is unchanged
    and the crop is never upsampled more than at full resolution. Output
    then differs slightly from the full-resolution resize (the DCT scaling
    low-passes instead of the bicubic kernel). Decoded images (decode_image)
    never take this path.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, JpegImagePlugin
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
    """Decode image bytes into a fully loaded PIL image of mode L or RGB.

    The full decode happens here, so a corrupt body raises in the caller's
    try (data.stream.decode_batch) and not later inside the transform.
    """
    return _load(Image.open(io.BytesIO(data)), pil_mode(in_chans))


def _load(img: Image.Image, mode: str) -> Image.Image:
    """Decode an opened image into `mode`, without a copy if it has that mode."""
    if img.mode == mode:
        # convert() to the same mode would decode and then copy the pixels.
        img.load()
        return img
    return img.convert(mode)


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


class _ToNormalisedTensor:
    """PIL image -> (x / 255 - mean) / std as float32 [C, H, W], optionally mirrored.

    Bit-for-bit T.Normalize(mean, std)(T.ToTensor()(image)) (the same float32
    division, subtraction and division per element), and with flip=True
    the same as first mirroring the image (F.hflip): the mirror is a
    negative stride in the one uint8 -> float32 copy. Modes other than L and
    RGB go through torchvision itself.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.reference = T.Compose([T.ToTensor(), T.Normalize(list(mean), list(std))])

    def __call__(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        if image.mode not in ("L", "RGB"):
            return self.reference(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)
        pixels = np.asarray(image)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        if flip:
            pixels = pixels[:, :, ::-1]
        out = torch.empty(pixels.shape, dtype=torch.float32)
        np.copyto(out.numpy(), pixels, casting="unsafe")
        return out.div_(255).sub_(self.mean).div_(self.std)


def _draft_scale(width: int, height: int, size: int) -> int:
    """Largest JPEG DCT scale 1/s (s in 8, 4, 2) keeping >= size pixels per side; 1 if none."""
    for scale in (8, 4, 2):
        if min(width, height) >= size * scale:
            return scale
    return 1


def _draft_decode(
    image: Image.Image, box: tuple[int, int, int, int], size: int
) -> tuple[Image.Image, tuple[float, float, float, float]] | None:
    """An undecoded JPEG's crop `box`, decoded at a reduced DCT scale.

    Returns (decoded image, box in its coordinates), or None when the image
    is already decoded, not a JPEG, or the crop is too small for any scale.
    The caller's image is left as it was (a fresh copy is drafted), so the
    same image object can be transformed again, e.g. when data.stream
    refills a batch.
    """
    if not isinstance(image, JpegImagePlugin.JpegImageFile) or not image.tile:
        return None
    left, top, right, bottom = box
    scale = _draft_scale(right - left, bottom - top, size)
    buffer = getattr(image, "fp", None)
    if scale == 1 or not isinstance(buffer, io.BytesIO):
        return None
    fresh = Image.open(io.BytesIO(buffer.getvalue()))
    width, height = fresh.size
    # draft() picks the largest s in (8, 4, 2, 1) <= min_i(size_i // request_i);
    # with request_i = size_i // scale that minimum is in [scale, 2 * scale).
    drafted = fresh.draft(image.mode, (width // scale, height // scale))
    if drafted is None:
        return None
    _, (_, _, draft_width, draft_height) = drafted
    # Draft pixel i covers original pixels [i * s, (i + 1) * s): divide edges by s.
    sx, sy = width / draft_width, height / draft_height
    fresh.load()
    return fresh, (left / sx, top / sy, right / sx, bottom / sy)


class _RandomResizedCropFlip:
    """T.Compose([T.RandomResizedCrop(size, bicubic), T.RandomHorizontalFlip()]) + tensor.

    Draws exactly what the torchvision pair draws (RandomResizedCrop.get_params
    on the image's size, then one torch.rand(1) < 0.5), so a torch seed gives
    the same crop and flip. See the module docstring for the draft path.
    """

    scale = (0.08, 1.0)
    ratio = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, size: int, to_tensor: _ToNormalisedTensor) -> None:
        self.size, self.to_tensor = size, to_tensor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        flip = bool(torch.rand(1) < 0.5)
        box = (left, top, left + width, top + height)
        out_size = (self.size, self.size)
        drafted = _draft_decode(image, box, self.size)
        if drafted is not None:
            source, draft_box = drafted
            out = source.resize(out_size, Image.Resampling.BICUBIC, box=draft_box)
        else:
            # crop() then resize(), as torchvision does: resize(box=) would let
            # pixels just outside the box into the border rows and columns.
            out = image.crop(box).resize(out_size, Image.Resampling.BICUBIC)
        return self.to_tensor(out, flip)


class _SquareResizeFlip:
    """"faces": T.Resize((size, size), bicubic) [+ T.RandomHorizontalFlip()] + tensor.

    At the target size the resize is skipped (torchvision makes a copy).
    """

    def __init__(self, size: int, flip: bool, to_tensor: _ToNormalisedTensor) -> None:
        self.size, self.flip, self.to_tensor = size, flip, to_tensor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return self.to_tensor(image, self.flip and bool(torch.rand(1) < 0.5))


class _ResizeCenterCrop:
    """Eval "imagenet": torchvision's Resize + CenterCrop, then the tensor conversion."""

    def __init__(self, size: int, to_tensor: _ToNormalisedTensor) -> None:
        # 256/224 is the usual centre-crop ratio; int() matches timm/torchvision.
        bicubic = T.InterpolationMode.BICUBIC
        self.geometry = T.Compose(
            [T.Resize(int(size * 256 / 224), interpolation=bicubic), T.CenterCrop(size)]
        )
        self.to_tensor = to_tensor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.geometry(image))


def _fast_transform(cfg: DataConfig, train: bool, mean: list[float], std: list[float]) -> Callable:
    """The "imagenet" and "faces" families (module docstring)."""
    size = cfg.image_size
    to_tensor = _ToNormalisedTensor(mean, std)
    if cfg.transform == "imagenet":
        return _RandomResizedCropFlip(size, to_tensor) if train else _ResizeCenterCrop(size, to_tensor)
    if cfg.transform == "faces":
        # Aligned crops are already the right size: the resize is then skipped.
        return _SquareResizeFlip(size, train, to_tensor)
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
        return _fast_transform(cfg, train and cfg.augment, mean, std)
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

"""The "imagenet" and "faces" transform families: crops, resizes, flips, to tensor.

This module owns the geometric transforms of decoded (or header-only) PIL
images and how their pixels become a tensor:
  - "imagenet" train: RandomResizedCrop(image_size, bicubic, area fraction
    in [data.crop_scale_min, 1]) + RandomHorizontalFlip, drawing exactly what the torchvision pair draws
    (RandomResizedCrop.get_params on the image size, then one
    torch.rand(1) < 0.5), so a torch seed gives the same crop and flip;
  - "imagenet" eval: Resize(shorter side to int(image_size * 256 / 224),
    bicubic) + CenterCrop(image_size), as torchvision/timm compute them;
  - "faces": a square resize to image_size (skipped at that size, which
    aligned crops already have) + a random flip for train.

Resampling (data.resize_backend):
  - "torch" (default): torch's antialiased bicubic on the uint8 pixels
    (F.interpolate): bit-for-bit torchvision.transforms.v2 on uint8 tensors
    with the same crop and flip; it rounds its two separable passes unlike
    PIL (mean |difference| 0.03 on 0..255, more than 1 apart in about 1e-4
    of the pixels) and is about 2.4x faster than PIL's bicubic at 224 px.
  - "pil": PIL's bicubic; the outputs are then bit-for-bit those of the
    torchvision v1 recipe on PIL images (then PILToTensor, or ToTensor +
    Normalize).
The tensor conversion is one strided copy out of the pixels (the flip is a
negative stride in it), for float output followed by three in-place passes.

Draft mode (train "imagenet", an image from data.transforms.open_image, i.e.
a JPEG not yet decoded): the random crop is drawn from the header size in
original pixel coordinates; when it still spans >= image_size pixels on
both sides at a reduced DCT scale (1/2, 1/4 or 1/8), the JPEG is decoded at
that scale and the crop box mapped to draft coordinates, so the crop
distribution is unchanged and the crop is never upsampled more than at full
resolution. The output then differs slightly from the full-resolution
resize (the DCT scaling low-passes instead of the bicubic kernel). This
path resamples with PIL's box resize (sub-pixel box) whatever the backend.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, JpegImagePlugin
from torchvision import transforms as T

from data.config import DataConfig

BICUBIC = Image.Resampling.BICUBIC


class ToTensor:
    """PIL image or uint8 [C, H, W] pixels -> the output tensor, optionally mirrored.

    Output: the uint8 pixels (T.PILToTensor) when `uint8`, else float32
    (x / 255 - mean) / std, bit-for-bit T.Normalize(mean, std)(T.ToTensor()(image))
    (the same float32 division, subtraction and division per element). With
    flip=True either equals first mirroring the image (F.hflip). Modes other
    than L and RGB go through torchvision itself.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], uint8: bool) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.uint8 = uint8
        self.reference: Callable = (
            T.PILToTensor() if uint8 else T.Compose([T.ToTensor(), T.Normalize(list(mean), list(std))])
        )

    def __call__(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        if image.mode not in ("L", "RGB"):
            return self.reference(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)
        return self.from_pixels(pixels_of(image), flip)

    def from_pixels(self, pixels: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """uint8 [C, H, W] pixels (any strides) -> the output, in one copy (plus the float passes)."""
        out = torch.empty(pixels.shape, dtype=torch.uint8 if self.uint8 else torch.float32)
        # numpy: a negative-stride source makes the flip part of the copy itself.
        source = pixels.numpy()
        np.copyto(out.numpy(), source[:, :, ::-1] if flip else source, casting="unsafe")
        return out if self.uint8 else out.div_(255).sub_(self.mean).div_(self.std)


def pixels_of(image: Image.Image) -> torch.Tensor:
    """uint8 [C, H, W] tensor of an L or RGB image's pixels (a copy, HWC strides for RGB)."""
    # np.array, not np.asarray: the same one copy out of PIL, but writable (torch.from_numpy warns otherwise)
    pixels = torch.from_numpy(np.array(image))
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


class Resampler:
    """A cropped region -> the output tensor at (width, height), with data.resize_backend."""

    def __init__(self, backend: str, to_tensor: ToTensor) -> None:
        self.torch_backend, self.to_tensor = backend == "torch", to_tensor

    def __call__(self, region: Image.Image, size: tuple[int, int], flip: bool) -> torch.Tensor:
        if region.size == size:  # torchvision resizes to the same size too; that is an exact copy
            return self.to_tensor(region, flip)
        if not self.torch_backend or region.mode not in ("L", "RGB"):
            return self.to_tensor(region.resize(size, BICUBIC), flip)
        return self.to_tensor.from_pixels(resize_pixels(pixels_of(region), size), flip)


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, size[1], size[0]] by torch's antialiased bicubic."""
    return F.interpolate(pixels[None], size=(size[1], size[0]), mode="bicubic", antialias=True)[0]


def draft_scale(width: int, height: int, size: int) -> int:
    """Largest JPEG DCT scale 1/s (s in 8, 4, 2) keeping >= size pixels per side; 1 if none."""
    for scale in (8, 4, 2):
        if min(width, height) >= size * scale:
            return scale
    return 1


def draft_decode(
    image: Image.Image, box: tuple[int, int, int, int], size: int
) -> tuple[Image.Image, tuple[float, float, float, float]] | None:
    """An undecoded JPEG's crop `box`, decoded at a reduced DCT scale.

    Returns (decoded image, box in its coordinates), or None when the image
    is already decoded, not a JPEG, or the crop is too small for any scale.
    The caller's image is left as it was (a fresh copy is drafted), so the
    same image object can be transformed again.
    """
    if not isinstance(image, JpegImagePlugin.JpegImageFile) or not image.tile:
        return None
    left, top, right, bottom = box
    scale = draft_scale(right - left, bottom - top, size)
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


class RandomResizedCropFlip:
    """Train "imagenet": RandomResizedCrop(size, bicubic, scale=(scale_min, 1)) + RandomHorizontalFlip (module
    docstring)."""

    ratio = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, size: int, resample: Resampler, scale_min: float = 0.08) -> None:
        self.size, self.resample, self.scale = size, resample, (scale_min, 1.0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        flip = bool(torch.rand(1) < 0.5)
        box = (left, top, left + width, top + height)
        out_size = (self.size, self.size)
        drafted = draft_decode(image, box, self.size)
        if drafted is not None:
            source, draft_box = drafted
            return self.resample.to_tensor(source.resize(out_size, BICUBIC, box=draft_box), flip)
        # crop() then resize(), as torchvision does: resize(box=) would let
        # pixels just outside the box into the border rows and columns.
        return self.resample(image.crop(box), out_size, flip)


class SquareResizeFlip:
    """ "faces": Resize((size, size), bicubic) [+ RandomHorizontalFlip()]."""

    def __init__(self, size: int, flip: bool, resample: Resampler) -> None:
        self.size, self.flip, self.resample = size, flip, resample

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.resample(image, (self.size, self.size), self.flip and bool(torch.rand(1) < 0.5))


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shorter`, as torchvision's Resize(int) computes it."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def eval_shorter_side(size: int) -> int:
    """Eval "imagenet" resizes the shorter side to this before its centre crop of `size`: the usual 256/224
    ratio; int() matches timm/torchvision."""
    return int(size * 256 / 224)


class ResizeCenterCrop:
    """Eval "imagenet": Resize(int(size * 256 / 224), bicubic) + CenterCrop(size)."""

    def __init__(self, size: int, resample: Resampler) -> None:
        self.size, self.shorter, self.resample = size, eval_shorter_side(size), resample

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = resized_size(*image.size, self.shorter)
        # torchvision's CenterCrop offsets; the resized image is never smaller than the crop.
        top, left = int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))
        full = self.resample(image, (width, height), False)
        return full[:, top : top + self.size, left : left + self.size].contiguous()


def crop_transform(cfg: DataConfig, train: bool, mean: list[float], std: list[float]) -> Callable:
    """The "imagenet" or "faces" transform of `cfg` (module docstring); `train` = with augmentation."""
    size = cfg.image_size
    resample = Resampler(cfg.resize_backend, ToTensor(mean, std, cfg.uint8_batches))
    if cfg.transform == "imagenet":
        return RandomResizedCropFlip(size, resample, cfg.crop_scale_min) if train else ResizeCenterCrop(size, resample)
    if cfg.transform == "faces":
        return SquareResizeFlip(size, train, resample)
    raise ValueError(f"data.transform={cfg.transform!r} is unknown; choose digits, imagenet or faces")

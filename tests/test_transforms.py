"""Tests of the transform families (data.transform) and normalisation (data.norm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import DataConfig
from data.transforms import build_transform, eval_preprocessing
from torchvision import transforms as T


def make_cfg(**overrides) -> DataConfig:
    # Float output, normalised here (the uint8 default is normalised later: test_transforms_fast)
    base = {"root": "unused", "num_classes": 2, "in_chans": 3, "augment": True, "uint8_batches": False}
    base.update(overrides)
    return DataConfig(**base)


def gradient(width: int, height: int) -> Image.Image:
    # Left-right asymmetric, so a horizontal flip is visible.
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    pixels = np.concatenate([x.repeat(height, 0), y.repeat(width, 1), (x + y).repeat(1, 0) / 2], 2)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@pytest.mark.parametrize("uint8", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size, shape", [(224, (300, 200)), (64, (64, 96)), (32, (500, 375))])
def test_imagenet_output_shape(train: bool, size: int, shape: tuple[int, int], uint8: bool) -> None:
    cfg = make_cfg(transform="imagenet", image_size=size, norm="imagenet", uint8_batches=uint8)
    out = build_transform(cfg, train)(gradient(*shape))
    assert out.shape == (3, size, size) and out.dtype == (torch.uint8 if uint8 else torch.float32)


def test_imagenet_eval_is_resize_then_center_crop() -> None:
    cfg = make_cfg(transform="imagenet", image_size=224, norm="inception")
    image = gradient(400, 300)
    # Shorter side 300 -> 256, then the centre 224 x 224.
    resized = image.resize((341, 256), Image.BICUBIC)
    left, top = round((341 - 224) / 2), round((256 - 224) / 2)
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 255
    got = build_transform(cfg, train=False)(image).permute(1, 2, 0).numpy() * 0.5 + 0.5
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("train", [True, False])
def test_faces_shape_and_no_resize_at_size(train: bool) -> None:
    cfg = make_cfg(transform="faces", image_size=112, norm="inception")
    image = gradient(112, 112)
    out = build_transform(cfg, train)(image)
    assert out.shape == (3, 112, 112)
    plain = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1) * 2 - 1
    # Exactly the pixels or their mirror image: no interpolation happened.
    assert torch.allclose(out, plain, atol=1e-6) or torch.allclose(out, plain.flip(2), atol=1e-6)
    if not train:
        assert torch.allclose(out, plain, atol=1e-6)
    assert build_transform(cfg, train)(gradient(120, 130)).shape == (3, 112, 112)


@pytest.mark.parametrize("family", ["faces", "imagenet"])
def test_train_flip_happens_for_some_seed(family: str) -> None:
    cfg = make_cfg(transform=family, image_size=64, augment=True)
    image = gradient(64, 64)
    transform = build_transform(cfg, train=True)
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(image)
        # Red grows left to right unless the image was mirrored.
        flipped += bool(out[0, :, 0].mean() > out[0, :, -1].mean())
    assert 0 < flipped < 12


@pytest.mark.parametrize("family", ["faces", "imagenet"])
def test_deterministic_under_fixed_seed(family: str) -> None:
    transform = build_transform(make_cfg(transform=family, image_size=48), train=True)
    image = gradient(80, 60)
    torch.manual_seed(7)
    a = transform(image)
    torch.manual_seed(7)
    assert torch.equal(a, transform(image))


def test_augment_false_equals_eval() -> None:
    cfg = make_cfg(transform="imagenet", image_size=48, augment=False)
    image = gradient(80, 60)
    assert torch.equal(build_transform(cfg, True)(image), build_transform(cfg, False)(image))


def test_norm_presets() -> None:
    image = Image.new("RGB", (8, 8), (255, 0, 128))
    out = build_transform(make_cfg(transform="faces", image_size=8, norm="imagenet"), False)(image)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    assert torch.allclose(out[:, 0, 0], expected, atol=1e-6)
    scalar = build_transform(make_cfg(transform="faces", image_size=8, mean=0.0, std=1.0), False)(image)
    assert torch.allclose(scalar[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-6)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"transform": "vit"}, "data.transform"),
        ({"norm": "clip"}, "data.norm"),
        ({"norm": "imagenet", "in_chans": 1}, "data.in_chans=1"),
        ({"mean": float("nan")}, "data.mean=nan must be a finite number"),  # the Python API skips the parser's check
        ({"std": float("inf")}, "data.std=inf must be > 0"),
        ({"sources": (("/r", float("inf")),)}, "finite weight > 0"),  # raised at the first batch before
    ],
)
def test_config_validation(override: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_cfg(**override).validate()


@pytest.mark.parametrize("in_chans", [1, 3])
def test_16_bit_grayscale_pngs_are_scaled_not_clipped(in_chans: int) -> None:
    """PIL's convert from I;16 clips every value at 255: a 16-bit scan decoded all white."""
    import io

    from data.transforms import decode_image

    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 32896, 65535, 255]], dtype=np.uint16)).save(buf, format="PNG")
    pixels = np.asarray(decode_image(buf.getvalue(), in_chans)).reshape(1, 4, -1)[0, :, 0]
    assert pixels.tolist() == [0, 128, 255, 0]


def test_the_crop_scale_is_a_setting_and_the_chest_recipes_take_hyp_vits() -> None:
    from data.crops import crop_transform
    from launch.recipes import get_recipe

    assert crop_transform(make_cfg(transform="imagenet"), True, [0.5], [0.5]).scale == (0.08, 1.0)
    assert crop_transform(make_cfg(transform="imagenet", crop_scale_min=0.2), True, [0.5], [0.5]).scale == (0.2, 1.0)
    assert (
        get_recipe("vits_sop_chest").data.crop_scale_min == 0.2 == get_recipe("vits_cub_chest_1gpu").data.crop_scale_min
    )
    assert get_recipe("vitl_imagenet_8gpu").data.crop_scale_min == 0.08
    with pytest.raises(ValueError, match="data.crop_scale_min=0.0 must be in"):
        make_cfg(crop_scale_min=0.0).validate()


@pytest.mark.parametrize(
    "family, size, shape", [("imagenet", 224, (400, 300)), ("imagenet", 64, (64, 96)), ("faces", 112, (120, 130))]
)
def test_the_exports_preprocessing_reproduces_evaluation_with_torchvision(
    family: str, size: int, shape: tuple[int, int]
) -> None:
    """export.json's input section (data.transforms.eval_preprocessing) is all another program needs to feed the
    exported model what evaluation fed it: it held the size and mean/std, not the resize and centre crop."""
    cfg = make_cfg(transform=family, image_size=size, norm="inception")
    steps = eval_preprocessing(cfg)
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[steps["interpolation"]]
    resize = steps["resize_shorter_side"] if steps["center_crop"] else steps["resize"]
    pipeline = [T.Resize(resize, interpolation=mode, antialias=True)]
    pipeline += [T.CenterCrop(steps["center_crop"])] if steps["center_crop"] else []
    reference = T.Compose([*pipeline, T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape[::-1], 3), dtype=np.uint8))
    got, expected = build_transform(cfg, train=False)(image), reference(image)
    assert got.shape == expected.shape == (3, size, size)
    assert (got - expected).abs().mean() < 0.01  # one resampler or another: the same pixels

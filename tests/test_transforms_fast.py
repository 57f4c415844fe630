"""The fast "imagenet"/"faces" transforms against the torchvision recipe they replace.

data.transforms reimplements RandomResizedCrop + RandomHorizontalFlip (+ Resize
/ CenterCrop) + ToTensor + Normalize for speed, and can decode an undecoded
JPEG at a reduced DCT scale (draft mode). These tests pin down that the
fast path draws the same random numbers, gives bit-identical tensors on
decoded images, keeps the crop distribution when it drafts, and that decode
errors still surface where data.stream catches them.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from data.config import DataConfig
from data.samples import BadSampleCounter, RawSample
from data.stream import decode_batch
from data.crops import draft_decode, draft_scale
from data.transforms import NORM_PRESETS, InputNormaliser, build_transform, decode_image, open_image

MEAN, STD = (list(v) for v in NORM_PRESETS["imagenet"])
BICUBIC = T.InterpolationMode.BICUBIC


def make_cfg(**overrides) -> DataConfig:
    # PIL resampling and float output, to compare with torchvision v1's recipe bit for bit
    # (the torch backend and uint8 output are compared with these at the end of the file)
    base = {
        "root": "unused",
        "num_classes": 2,
        "in_chans": 3,
        "augment": True,
        "transform": "imagenet",
        "norm": "imagenet",
        "image_size": 224,
        "uint8_batches": False,
        "resize_backend": "pil",
    }
    base.update(overrides)
    return DataConfig(**base)


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth colour ramps plus noise: every crop and flip changes the pixels."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    base = rng.uniform(0, 255, 3).astype(np.float32)
    pixels = base * y + (255 - base) * x + rng.normal(0, 20, (height, width, 3)).astype(np.float32)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB").convert(mode)


def jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    photo(width, height, seed, mode).save(out, "JPEG", quality=90)
    return out.getvalue()


def reference_train(size: int, mean=MEAN, std=STD) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(size, interpolation=BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def run_seeded(transform, image: Image.Image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output, and the RNG state after it (what the next image of a batch sees)."""
    torch.manual_seed(seed)
    out = transform(image)
    return out, torch.get_rng_state()


@pytest.mark.parametrize("shape", [(500, 375), (256, 256), (120, 90), (375, 500), (1024, 768)])
def test_train_bitwise_equal_to_torchvision(shape: tuple[int, int]) -> None:
    # A decoded image never drafts: same crop, same flip, same float ops, same RNG use.
    image = photo(*shape)
    fast, ref = build_transform(make_cfg(), train=True), reference_train(224)
    flips = 0
    for seed in range(20):
        got, state = run_seeded(fast, image, seed)
        want, ref_state = run_seeded(ref, image, seed)
        assert got.shape == (3, 224, 224) and got.dtype == torch.float32
        assert torch.equal(got, want), seed
        assert torch.equal(state, ref_state), seed
        torch.manual_seed(seed)
        T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
        flips += bool(torch.rand(1) < 0.5)
    assert 0 < flips < 20  # both the mirrored and the plain path were compared
    # A batch shares one seeded RNG stream: whole sequences match too.
    torch.manual_seed(3)
    seq = [fast(image) for _ in range(5)]
    torch.manual_seed(3)
    assert all(torch.equal(a, ref(image)) for a in seq)


def test_train_grayscale_scalar_norm_bitwise() -> None:
    cfg = make_cfg(in_chans=1, norm="scalar", mean=0.3, std=0.7, image_size=64)
    image = photo(200, 150, mode="L")
    fast, ref = build_transform(cfg, train=True), reference_train(64, [0.3], [0.7])
    for seed in range(10):
        got, _ = run_seeded(fast, image, seed)
        want, _ = run_seeded(ref, image, seed)
        assert got.shape == (1, 64, 64) and torch.equal(got, want)


@pytest.mark.parametrize("shape", [(500, 375), (160, 120), (224, 224)])
def test_eval_unchanged(shape: tuple[int, int]) -> None:
    image = photo(*shape)
    ref = T.Compose([T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    assert torch.equal(build_transform(make_cfg(), train=False)(image), ref(image))
    # data.augment=false: the train transform is the eval one.
    assert torch.equal(build_transform(make_cfg(augment=False), train=True)(image), ref(image))


@pytest.mark.parametrize("shape", [(112, 112), (130, 120)])
def test_faces_bitwise_equal_to_torchvision(shape: tuple[int, int]) -> None:
    image = photo(*shape)
    cfg = make_cfg(transform="faces", image_size=112, norm="inception")
    resize = T.Resize((112, 112), interpolation=BICUBIC)
    tail = [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    assert torch.equal(build_transform(cfg, False)(image), T.Compose([resize, *tail])(image))
    ref = T.Compose([resize, T.RandomHorizontalFlip(), *tail])
    for seed in range(6):
        got, _ = run_seeded(build_transform(cfg, True), image, seed)
        assert torch.equal(got, run_seeded(ref, image, seed)[0])


def test_unusual_mode_falls_back_to_torchvision() -> None:
    # Modes other than L/RGB (here bilevel "1") go through ToTensor itself.
    image = photo(32, 32, mode="1")
    cfg = make_cfg(transform="faces", image_size=32, norm="scalar", in_chans=1)
    ref = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])])
    out = build_transform(cfg, False)(image)
    assert out.shape == (1, 32, 32) and torch.equal(out, ref(image))
    for seed in range(4):
        torch.manual_seed(seed)
        flip = bool(torch.rand(1) < 0.5)
        want = ref(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)
        assert torch.equal(run_seeded(build_transform(cfg, True), image, seed)[0], want)


def test_decode_image_loads_in_place_and_converts() -> None:
    data = jpeg(64, 48)
    image = decode_image(data, 3)
    assert image.mode == "RGB" and image.size == (64, 48) and not image.tile  # fully decoded
    with Image.open(io.BytesIO(data)) as plain:
        assert np.array_equal(np.asarray(image), np.asarray(plain.convert("RGB")))
    gray = decode_image(data, 1)
    assert gray.mode == "L"
    assert decode_image(jpeg(64, 48, mode="L"), 3).mode == "RGB"


def test_corrupt_jpeg_raises_in_decode() -> None:
    data = jpeg(200, 150)
    truncated, garbage = data[: len(data) // 2], b"\xff\xd8\xff\xe0 not a jpeg at all"
    # decode_image decodes every pixel, so both fail right there (inside the
    # try of data.stream.decode_batch).
    with pytest.raises(OSError, match="truncated"):
        decode_image(truncated, 3)
    with pytest.raises(Exception):
        decode_image(garbage, 3)
    # open_image parses only the header: garbage fails there, a truncated body
    # only in the transform - why data.stream's decode_batch catches errors
    # around the transform too.
    with pytest.raises(Exception):
        open_image(garbage, 3)
    lazy = open_image(truncated, 3)
    with pytest.raises(OSError, match="truncated"):
        build_transform(make_cfg(image_size=32), train=True)(lazy)


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
def test_stream_decode_batch_counts_corrupt_jpeg_and_is_deterministic() -> None:
    # The stream's contract: a corrupt body fails inside decode_batch's try, is
    # counted, and its place is refilled; the same seed gives the same batch.
    cfg = make_cfg(image_size=32)
    good = [RawSample(image=jpeg(80, 60, seed=i), label=i % 2, shard="s", key=f"k{i}") for i in range(4)]
    bad = RawSample(image=jpeg(80, 60)[:300], label=1, shard="s", key="bad")
    raw = good[:2] + [bad] + good[2:]
    transform = build_transform(cfg, train=True)
    counter = BadSampleCounter(10, "test")
    first = decode_batch(raw, cfg, transform, counter, seed=11)
    second = decode_batch(raw, cfg, transform, BadSampleCounter(10, "test"), seed=11)
    assert counter.count == 1
    assert first is not None and second is not None
    assert first[0].shape == (5, 3, 32, 32) and torch.equal(first[0], second[0])
    other = decode_batch(raw, cfg, transform, BadSampleCounter(10, "test"), seed=12)
    assert other is not None and not torch.equal(first[0], other[0])


def test_draft_scale_keeps_output_resolution() -> None:
    assert draft_scale(447, 1000, 224) == 1
    assert draft_scale(448, 448, 224) == 2
    assert draft_scale(900, 1000, 224) == 4
    assert draft_scale(2000, 1800, 224) == 8
    for w in range(100, 2000, 37):
        s = draft_scale(w, w + 5, 224)
        assert w / s >= 224 or s == 1


def test_draft_decode_maps_box_to_draft_coordinates() -> None:
    data = jpeg(2048, 1536)
    lazy = open_image(data, 3)
    assert lazy.tile  # header only
    box = (100, 50, 1100, 950)  # 1000 x 900 -> scale 4 keeps 250 x 225 >= 224
    drafted = draft_decode(lazy, box, 224)
    assert drafted is not None
    image, draft_box = drafted
    assert image.size == (512, 384)
    assert draft_box == pytest.approx((25.0, 12.5, 275.0, 237.5))
    assert lazy.tile and lazy.size == (2048, 1536)  # the caller's image is untouched
    # Too small a crop, a decoded image, or a PNG: no draft.
    assert draft_decode(lazy, (0, 0, 400, 400), 224) is None
    assert draft_decode(decode_image(data, 3), box, 224) is None


@pytest.mark.parametrize("shape", [(2048, 1536), (1200, 1600)])
def test_draft_path_same_crops_close_pixels(shape: tuple[int, int]) -> None:
    # On an undecoded JPEG the crop is drawn from the header size with the same
    # draws, then decoded at 1/2..1/8 scale when it keeps >= 224 px per side.
    data = jpeg(*shape)
    fast, ref = build_transform(make_cfg(), train=True), reference_train(224)
    full = decode_image(data, 3)
    drafted = 0
    for seed in range(24):
        got, state = run_seeded(fast, open_image(data, 3), seed)
        want, ref_state = run_seeded(ref, full, seed)
        assert torch.equal(state, ref_state)  # same RNG use, so same crop and flip
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(full, (0.08, 1.0), (3 / 4, 4 / 3))
        if draft_scale(w, h, 224) == 1:
            assert torch.equal(got, want)
            continue
        drafted += 1
        # Pixel differences of a DCT-domain vs bicubic downscale, on 0..255.
        diff = (got - want) * torch.tensor(STD).view(3, 1, 1) * 255
        assert diff.abs().mean() < 3.0, seed
        # A wrong box (shifted crop or missed flip) would differ by far more.
        assert (got - want.flip(2)).abs().mean() > 5 * (got - want).abs().mean()
    assert drafted >= 8


def test_lazy_image_reusable_and_deterministic() -> None:
    # data.stream may transform one image object twice (refilling a batch).
    data = jpeg(2048, 1536)
    fast = build_transform(make_cfg(), train=True)
    lazy = open_image(data, 3)
    a, _ = run_seeded(fast, lazy, 5)
    b, _ = run_seeded(fast, lazy, 5)
    c, _ = run_seeded(fast, open_image(data, 3), 5)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_crop_distribution_matches_torchvision_statistically() -> None:
    # Independent of bitwise equality: crop area fraction and aspect ratio of the
    # fast path's chosen boxes follow RandomResizedCrop's law (scale U(0.08, 1),
    # log-ratio U(log 3/4, log 4/3), with rejection when out of bounds).
    boxes = []
    original = Image.Image.crop

    def spy(self, box=None):
        boxes.append(box)
        return original(self, box)

    image = photo(500, 375)
    fast = build_transform(make_cfg(image_size=16), train=True)
    torch.manual_seed(0)
    Image.Image.crop = spy
    try:
        for _ in range(2000):
            fast(image)
    finally:
        Image.Image.crop = original
    area = np.array([(r - left) * (b - t) for left, t, r, b in boxes]) / (500 * 375)
    ratio = np.log(np.array([(r - left) / (b - t) for left, t, r, b in boxes]))
    torch.manual_seed(1)
    ref = [T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    ref_area = np.array([h * w for _, _, h, w in ref]) / (500 * 375)
    ref_ratio = np.log(np.array([w / h for _, _, h, w in ref]))
    assert len(boxes) == 2000
    assert abs(area.mean() - ref_area.mean()) < 0.03 and abs(ratio.mean() - ref_ratio.mean()) < 0.03
    assert abs(np.quantile(area, 0.9) - np.quantile(ref_area, 0.9)) < 0.04


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "family, size, shape", [("imagenet", 224, (500, 375)), ("faces", 112, (130, 120)), ("digits", 32, (28, 28))]
)
def test_uint8_output_normalises_to_the_float_output(
    family: str, size: int, shape: tuple[int, int], train: bool
) -> None:
    # data.uint8_batches: the transform stops at the pixels; InputNormaliser, applied to the batch on
    # the device, gives bit for bit what the float transform gives, with the same RNG use.
    digits = family == "digits"
    cfg = make_cfg(
        transform=family,
        image_size=size,
        in_chans=1 if digits else 3,
        norm="scalar" if digits else "imagenet",
        mean=0.3,
        std=0.7,
        uint8_batches=True,
    )
    image = photo(*shape, mode="L" if digits else "RGB")
    pixels_of = build_transform(cfg, train)
    floats_of = build_transform(dataclasses.replace(cfg, uint8_batches=False), train)
    normalise = InputNormaliser(cfg)
    outputs = set()
    for seed in range(6):
        got, state = run_seeded(pixels_of, image, seed)
        want, want_state = run_seeded(floats_of, image, seed)
        assert got.dtype == torch.uint8 and got.shape == want.shape == (cfg.in_chans, size, size)
        assert torch.equal(state, want_state)
        assert torch.equal(normalise(got[None], torch.device("cpu"), torch.float32)[0], want)
        outputs.add(got.numpy().tobytes())
    assert (len(outputs) > 1) == train  # train really augmented (faces: only flips), eval did not


def test_stream_decodes_large_train_jpegs_in_draft_mode() -> None:
    # data.jpeg_draft (default): the stream opens train JPEGs lazily, so the "imagenet" crop can
    # decode them at a reduced scale; the crops are the same draws, only the downscale differs.
    cfg = make_cfg(uint8_batches=True)
    data = jpeg(2048, 1536)
    raw = [RawSample(image=data, label=0, shard="s", key=f"k{i}") for i in range(8)]
    transform = build_transform(cfg, train=True)
    drafted = decode_batch(raw, cfg, transform, BadSampleCounter(0, "test"), seed=3)
    full = decode_batch(raw, dataclasses.replace(cfg, jpeg_draft=False), transform, BadSampleCounter(0, "t"), 3)
    assert drafted is not None and full is not None
    torch.manual_seed(3)
    assert torch.equal(drafted[0], torch.stack([transform(open_image(data, 3)) for _ in raw]))
    torch.manual_seed(3)
    assert torch.equal(full[0], torch.stack([transform(decode_image(data, 3)) for _ in raw]))
    differ = [not torch.equal(a, b) for a, b in zip(drafted[0], full[0])]
    assert sum(differ) >= 4  # most of these crops span >= 448 px: decoded at 1/2 or less
    close = (drafted[0].float() - full[0].float()).abs().mean()
    assert close < 3.0  # on 0..255: the same crops, not merely similar images
    # Evaluation never drafts (no seed): the centre crop of the full decode.
    evaluated = decode_batch(raw[:2], cfg, build_transform(cfg, train=False), BadSampleCounter(0, "t"), None)
    assert evaluated is not None
    assert torch.equal(evaluated[0][0], build_transform(cfg, train=False)(decode_image(data, 3)))


def torchvision_v2(cfg: DataConfig, train: bool):
    """The recipe in torchvision.transforms.v2 on uint8 tensors, drawing the crop and flip as v1 does."""
    interpolation = v2.InterpolationMode.BICUBIC
    size = cfg.image_size

    def transform(image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        if cfg.transform == "faces":
            flip = train and bool(torch.rand(1) < 0.5)
            out = v2.functional.resize(pixels, [size, size], interpolation=interpolation, antialias=True)
        elif train:
            top, left, h, w = T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
            flip = bool(torch.rand(1) < 0.5)
            out = v2.functional.resized_crop(
                pixels, top, left, h, w, [size, size], interpolation=interpolation, antialias=True
            )
        else:
            flip = False
            out = v2.CenterCrop(size)(
                v2.Resize(int(size * 256 / 224), interpolation=interpolation, antialias=True)(pixels)
            )
        return out.flip(-1) if flip else out

    return transform


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "family, size, shape",
    [
        ("imagenet", 224, (500, 375)),
        ("imagenet", 224, (256, 256)),
        ("imagenet", 64, (120, 90)),
        ("faces", 112, (130, 120)),
    ],
)
def test_torch_resize_backend_is_torchvision_v2_and_close_to_pil(
    family: str, size: int, shape: tuple[int, int], train: bool
) -> None:
    # data.resize_backend=torch (default): the same crops and flips (same RNG use) resampled by torch's
    # antialiased uint8 bicubic: bit for bit torchvision.transforms.v2 on uint8 tensors, and close to
    # PIL's bicubic (the two round their two separable passes differently).
    cfg = make_cfg(transform=family, image_size=size, uint8_batches=True, resize_backend="torch")
    image = photo(*shape)
    ours, reference = build_transform(cfg, train), torchvision_v2(cfg, train)
    by_pil = build_transform(dataclasses.replace(cfg, resize_backend="pil"), train)
    for seed in range(8 if train else 1):
        got, state = run_seeded(ours, image, seed)
        want, want_state = run_seeded(reference, image, seed)
        assert got.dtype == torch.uint8 and got.shape == (3, size, size)
        assert torch.equal(got, want) and torch.equal(state, want_state), seed
        pil, pil_state = run_seeded(by_pil, image, seed)
        assert torch.equal(state, pil_state)
        diff = (got.int() - pil.int()).abs().float()
        assert diff.mean() < 0.5 and (diff > 2).float().mean() < 0.02, (seed, diff.max(), diff.mean())


def test_torch_resize_backend_float_output_and_aligned_faces() -> None:
    image = photo(300, 200)
    cfg = make_cfg(resize_backend="torch", uint8_batches=True)
    pixels, _ = run_seeded(build_transform(cfg, True), image, 4)
    floats, _ = run_seeded(build_transform(dataclasses.replace(cfg, uint8_batches=False), True), image, 4)
    normalise = InputNormaliser(cfg)
    assert torch.equal(normalise(pixels[None], torch.device("cpu"), torch.float32)[0], floats)
    # Faces already at the size are copied, not resampled, by either backend.
    face = photo(112, 112)
    faces = make_cfg(transform="faces", image_size=112, resize_backend="torch", uint8_batches=True)
    out = build_transform(faces, train=False)(face)
    assert torch.equal(out, torch.from_numpy(np.array(face)).permute(2, 0, 1))

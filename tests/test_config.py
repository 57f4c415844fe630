"""Config tree: round trips, overrides, validation errors, every recipe builds."""
from __future__ import annotations

import pytest

from train.overrides import apply_overrides
from launch.recipes import RECIPES, get_recipe
from train.config import RunConfig, load_yaml, save_yaml


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_validates_and_round_trips(name: str, tmp_path) -> None:
    cfg = get_recipe(name).validate()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    save_yaml(cfg, str(tmp_path / "config.yaml"))
    assert load_yaml(str(tmp_path / "config.yaml")) == cfg


def test_overrides_are_typed() -> None:
    cfg = apply_overrides(get_recipe("mnist_distarc"),
                          ["optim.lr=3e-4", "max_steps=7", "zero.bf16=true", "loss.form=paper", "data.root=/x"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.max_steps == 7 and cfg.zero.bf16 is True and cfg.loss.form == "paper" and cfg.data.root == "/x"
    assert get_recipe("mnist_distarc").optim.lr != 3e-4  # the recipe itself is untouched


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown override key 'optim.lrr'"),
    ("nosuch=1", "unknown override key 'nosuch'"),
    ("max_steps=ten", "max_steps='ten' is not a valid int"),
    ("zero.bf16=maybe", "zero.bf16='maybe' is not a valid bool"),
    ("optim=1", "names a section"),
    ("max_steps", "not of the form key=value"),
])
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_recipe("mnist_distarc"), [override])


def test_unknown_recipe() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*mnist_distarc"):
        get_recipe("nope")


@pytest.mark.parametrize("override, message", [
    ("loss.margin=1.6", "loss.margin=1.6 must be in \\[0, pi/2\\)"),
    ("loss.margin=-0.1", "loss.margin"),
    ("loss.name=triplet", "loss.name='triplet' is unknown"),
    ("loss.form=code", "loss.form='code' is unknown"),
    ("zero.stage=4", "zero.stage=4"),
    ("model.in_chans=3", "model.in_chans=3 differs from data.in_chans=1"),
    ("model.img_size=64", "model.img_size=64 differs from data.image_size"),
    ("max_steps=0", "max_steps=0 must be >= 1"),
    ("data.batch_size=0", "batch_size"),
    ("data.num_classes=-1", "num_classes"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps"),
    ("loss.num_spheres=0", "loss.num_spheres"),
    ("name=a/b", "name='a/b'"),
    ("loss.sample_rate=0", "loss.sample_rate=0.0 must be in \\(0, 1\\]"),
    ("metrics.recall_ks=1,x", "metrics.recall_ks='1,x'"),
])
def test_validation_errors(override: str, message: str) -> None:
    cfg = apply_overrides(get_recipe("mnist_distarc"), [override])
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_num_classes_zero_is_read_from_the_manifest(mnist_root: str, tmp_path) -> None:
    cfg = apply_overrides(get_recipe("mnist_distarc"), [f"data.root={mnist_root}", "data.num_classes=0"])
    assert cfg.resolved().data.num_classes == 10
    sources = apply_overrides(cfg, [f"data.sources={mnist_root}=1,{mnist_root}=1"])
    assert sources.resolved().data.num_classes == 20  # the sum of the sources' train label spaces
    missing = apply_overrides(cfg, [f"data.root={tmp_path}/none", "data.prepare=none"])
    with pytest.raises(FileNotFoundError, match="data.num_classes=0 is read from the manifest.*set data.num_classes"):
        missing.resolved()
    # while data.prepare has yet to write the data set, it stays 0 (run() resolves it again)
    assert apply_overrides(cfg, [f"data.root={tmp_path}/later"]).resolved().data.num_classes == 0


def test_chest_settings_are_checked_only_for_chest_heads() -> None:
    base = get_recipe("mnist_chest")
    with pytest.raises(ValueError, match="proxies_per_class=1 < 2 with loss.chest.tau=0.5"):
        apply_overrides(base, ["loss.chest.proxies_per_class=1"]).validate()
    with pytest.raises(ValueError, match="curvature=-1.0 must be > 0"):
        apply_overrides(base, ["loss.chest.curvature=-1"]).validate()
    for recipe in ("mnist_chest", "mnist_distarc"):  # Partial-FC for both families, in (0, 1] only
        apply_overrides(get_recipe(recipe), ["loss.sample_rate=0.5"]).validate()
        with pytest.raises(ValueError, match=r"loss.sample_rate=1.5 must be in \(0, 1\]"):
            apply_overrides(get_recipe(recipe), ["loss.sample_rate=1.5"]).validate()


def test_from_dict_rejects_unknown_and_mistyped_keys() -> None:
    raw = get_recipe("mnist_distarc").to_dict()
    raw["optim"]["lrr"] = 1.0
    with pytest.raises(ValueError, match="optim.lrr"):
        RunConfig.from_dict(raw)
    raw = get_recipe("mnist_distarc").to_dict()
    raw["max_steps"] = "many"
    with pytest.raises(ValueError, match="max_steps='many'"):
        RunConfig.from_dict(raw)


def test_norm_timm_takes_the_backbones_own_values() -> None:
    # The papers' "normalisation per backbone": data.norm=timm becomes model.name's pretrained mean/std.
    import timm.data

    from data.transforms import normalisation

    vit = apply_overrides(get_recipe("vitl_imagenet_8gpu"), []).resolved()
    assert vit.data.norm == "inception" and vit.data.transform == "imagenet"  # timm's ViT weights use 0.5/0.5
    cnn = apply_overrides(get_recipe("vitl_imagenet_8gpu"), ["model.name=resnet50"]).resolved()
    assert cnn.data.norm == "imagenet"
    clip = apply_overrides(get_recipe("vits_cub_chest_1gpu"),
                           ["model.name=vit_base_patch16_clip_224.openai", "model.embed_dim=768",
                            "data.num_classes=100"]).resolved()
    assert clip.data.norm == "channels"
    mean, std = normalisation(clip.data)
    assert mean == list(timm.data.OPENAI_CLIP_MEAN) and std == list(timm.data.OPENAI_CLIP_STD)
    assert RunConfig.from_dict(clip.to_dict()) == clip and clip.resolved() == clip  # recorded as resolved
    with pytest.raises(ValueError, match="no pretrained config .* model.name='no_such_net'"):
        apply_overrides(get_recipe("vitl_imagenet_8gpu"), ["model.name=no_such_net"]).resolved()
    with pytest.raises(ValueError, match="resolved from model.name"):
        normalisation(get_recipe("vitl_imagenet_8gpu").data)  # unresolved: no silent default


@pytest.mark.parametrize("overrides, message", [
    (["data.norm=channels", "data.channel_mean=0.5,0.5", "data.channel_std=0.2,0.2,0.2"], "channel_mean"),
    (["data.norm=channels", "data.channel_mean=0.5,0.5,0.5", "data.channel_std=0.2,0,0.2"], "channel_std"),
    (["data.norm=channels", "data.channel_mean=nan,0.5,0.5", "data.channel_std=0.2,0.2,inf"], "channel_mean"),
    (["data.norm=timm", "data.in_chans=1", "model.in_chans=1"], "data.in_chans=1"),
    (["data.resize_backend=cv2"], "data.resize_backend"),
    (["data.uint8_batches=maybe"], "data.uint8_batches"),
])
def test_bad_normalisation_and_speed_settings(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_recipe("vitl_imagenet_8gpu"), overrides).resolved()

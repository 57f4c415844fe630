"""The embedding network: optional neck, and local pretrained trunks (a 21k-style checkpoint with its
classifier) loaded with the classifier dropped, ViT position embeddings resampled, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch

from model.backbone import build_backbone
from model.config import ModelConfig

VIT = dict(name="vit_tiny_patch16_224", in_chans=3, patch_size=8)


def _pretrained(tmp_path, name: str, num_classes: int, wrap: bool, **kwargs) -> tuple[torch.nn.Module, str]:
    """A timm model with a classifier, saved as a training script would (optionally wrapped, DDP prefix)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()
    state = model.state_dict()
    if wrap:
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}
    path = str(tmp_path / f"{name}-{num_classes}.pth")
    torch.save(state, path)
    return model, path


@pytest.mark.parametrize("wrap", [False, True])
def test_vit_checkpoint_with_classifier_loads_and_computes_the_same_features(tmp_path, wrap: bool) -> None:
    source, path = _pretrained(tmp_path, VIT["name"], 50, wrap, img_size=32, patch_size=8)
    model = build_backbone(ModelConfig(**VIT, img_size=32, embed_dim=192, neck=False, checkpoint_path=path)).eval()
    assert isinstance(model.neck, torch.nn.Identity)
    ours, theirs = model.trunk.state_dict(), source.state_dict()
    assert set(theirs) - set(ours) == {"head.weight", "head.bias"}
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_vit_position_embeddings_are_resampled_to_another_image_size(tmp_path) -> None:
    source, path = _pretrained(tmp_path, VIT["name"], 50, False, img_size=32, patch_size=8)
    model = build_backbone(ModelConfig(**VIT, img_size=48, embed_dim=64, checkpoint_path=path))
    assert model.trunk.pos_embed.shape == (1, 1 + 6 * 6, 192) != source.pos_embed.shape
    torch.testing.assert_close(model.trunk.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.neck.weight.shape == (64, 192)


def test_cnn_checkpoint_drops_its_fc(tmp_path) -> None:
    source, path = _pretrained(tmp_path, "test_resnet", 21, False, in_chans=1)
    model = build_backbone(ModelConfig(name="test_resnet", in_chans=1, embed_dim=16, checkpoint_path=path))
    for key, value in model.trunk.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_checkpoint_of_another_architecture_names_the_file_and_the_fix(tmp_path) -> None:
    _, path = _pretrained(tmp_path, "vit_small_patch16_224", 50, False, img_size=32, patch_size=8)
    with pytest.raises(
        ValueError,
        match=r"vit_small_patch16_224-50.pth does not fit model.name=vit_tiny.*"
        r"shape mismatches, first: .*model.name, model.in_chans",
    ):
        build_backbone(ModelConfig(**VIT, img_size=32, embed_dim=64, checkpoint_path=path))
    with pytest.raises(FileNotFoundError, match="model.checkpoint_path=.*nowhere.pth does not exist"):
        build_backbone(ModelConfig(**VIT, img_size=32, checkpoint_path=str(tmp_path / "nowhere.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a readable torch or safetensors checkpoint"):
        build_backbone(ModelConfig(**VIT, img_size=32, checkpoint_path=str(tmp_path / "junk.pth")))


def test_no_neck_needs_the_trunk_width() -> None:
    with pytest.raises(ValueError, match="outputs 192 features and model.embed_dim=64; set model.embed_dim=192"):
        build_backbone(ModelConfig(**VIT, img_size=32, embed_dim=64, neck=False))


@pytest.mark.parametrize("name, width", [("mobilenetv3_small_050", 1024), ("resnet18", 512)])
def test_neck_takes_the_pooled_output_width(name: str, width: int) -> None:
    """MobileNetV3's pooled output passes a conv head: 1,024 features from 288 channels (timm's
    head_hidden_size); sizing the neck by num_features failed at the first forward (2x1024 and 288x64)."""
    model = build_backbone(ModelConfig(name=name, in_chans=3, embed_dim=64))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match=f"outputs {width} features"):
        build_backbone(ModelConfig(name=name, in_chans=3, embed_dim=64, neck=False))


@pytest.mark.parametrize(
    "settings, message",
    [
        # what validate cannot see: an architecture argument the model's constructor lacks (VGG: no drop path)
        (dict(name="resnet18", img_size=28), "model.img_size: resnet18 has no img_size.*set model.img_size=0"),
        (dict(name="resnet18", patch_size=8), "model.patch_size: resnet18 has no patch_size.*set model.patch_size=0"),
        (dict(name="vgg11", drop_path_rate=0.1), "model.drop_path_rate: vgg11 has no drop_path_rate"),
        (dict(name="vgg11", grad_checkpointing=True), "timm's vgg11 cannot checkpoint.*model.grad_checkpointing=false"),
    ],
)
def test_settings_a_trunk_lacks_name_the_setting(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):  # timm's own TypeError / AssertionError named neither
        build_backbone(ModelConfig(**settings))

"""Config tree: round trips, overrides, typed list fields, validation errors, every recipe builds."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

import data.config
from train.overrides import apply_overrides
from launch.recipes import RECIPES, get_recipe
from model.config import ModelConfig
from train.config import RunConfig, load_yaml, save_yaml
from train.config_values import override_text


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_validates_and_round_trips(name: str, tmp_path) -> None:
    cfg = get_recipe(name).validate()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    save_yaml(cfg, str(tmp_path / "config.yaml"))
    assert load_yaml(str(tmp_path / "config.yaml")) == cfg


def test_overrides_are_typed() -> None:
    cfg = apply_overrides(
        get_recipe("mnist_distarc"),
        ["optim.lr=3e-4", "max_steps=7", "zero.bf16=true", "loss.form=paper", "data.root=/x"],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.max_steps == 7 and cfg.zero.bf16 is True and cfg.loss.form == "paper" and cfg.data.root == "/x"
    assert get_recipe("mnist_distarc").optim.lr != 3e-4  # the recipe itself is untouched


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown override key 'optim.lrr'"),
        ("nosuch=1", "unknown override key 'nosuch'"),
        ("max_steps=ten", "max_steps='ten' is not a valid int"),
        ("zero.bf16=maybe", "zero.bf16='maybe' is not a valid bool"),
        ("optim=1", "names a section"),
        ("max_steps", "not of the form key=value"),
        # typed list fields: a bad item names the setting, the item and a valid value
        (
            "metrics.recall_ks=1,x",
            r"metrics.recall_ks='1,x': item 'x' must read an integer; e\.g\. metrics.recall_ks=1,2",
        ),
        ("data.channel_mean=0.5,a,0.5", r"data.channel_mean='0.5,a,0.5': item 'a' must read a number; e\.g\. data"),
        (
            "data.sources=/a=0.7,/b",
            r"data.sources='/a=0.7,/b': item '/b' must read ROOT=WEIGHT; e\.g\. data.sources=/da",
        ),
        ("data.sources=/a=x", "item '/a=x' must read ROOT=WEIGHT"),
        ("data.sources==1", "item '=1' must read ROOT=WEIGHT"),
        (
            "slurm.sbatch_extra=--exclusive",
            r"item '--exclusive' must read key=value without dashes; e\.g\. slurm.sbatch_",
        ),
        ("slurm.sbatch_extra==a100", "item '=a100' must read key=value without dashes"),
        # non-finite numbers pass every range check written "x <= 0" (nan) or "x > 0" (inf)
        ("optim.lr=nan", "optim.lr='nan' must be a finite number"),
        ("loss.scale=inf", "loss.scale='inf' must be a finite number"),
        ("checkpoint.every_minutes=-inf", "must be a finite number"),
        ("data.channel_mean=0.5,nan,0.5", "item 'nan' must read a number"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_recipe("mnist_distarc"), [override])


def test_unknown_recipe() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*mnist_distarc"):
        get_recipe("nope")


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.margin=1.6", "loss.margin=1.6 must be in \\[0, pi/2\\)"),
        ("loss.margin=-0.1", "loss.margin"),
        ("loss.name=triplet", "loss.name='triplet' is unknown"),
        ("loss.form=code", "loss.form='code' is unknown"),
        ("zero.stage=4", "zero.stage=4"),
        ("model.in_chans=3", "model.in_chans=3 differs from data.in_chans=1"),
        ("model.img_size=64", "model.img_size=64 differs from data.image_size"),
        ("model.name=vit_tiny_patch16_224", "built for 224x224 images.*data.image_size=28; set model.img_size=28"),
        ("model.name=hf-hub:timm/vit_tiny_patch16_224", "names a Hugging Face Hub model, and nothing is downloaded"),
        ("model.name=HF_HUB:timm/vit_tiny_patch16_224", "names a Hugging Face Hub model"),  # timm's old spelling
        ("max_steps=0", "max_steps=0 must be >= 1"),
        ("data.batch_size=0", "batch_size"),
        ("data.num_classes=-1", "num_classes"),
        ("checkpoint.every_steps=0", "checkpoint.every_steps"),
        ("loss.num_spheres=0", "loss.num_spheres"),
        ("name=a/b", "name='a/b'"),
        ("loss.sample_rate=0", "loss.sample_rate=0.0 must be in \\(0, 1\\]"),
        ("metrics.recall_ks=1,0", "metrics.recall_ks must hold integers >= 1"),
        ("data.sources=data-cache/mnist5k=1,/b=-1", "data.sources item /b=-1 must read ROOT=WEIGHT with a finite"),
        ("data.sources=/b=1", "data.sources starts with '/b' but data.root='data-cache/mnist5k'"),
        (
            "slurm.sbatch_extra=exclusive=true;--mem=100",
            "sbatch_extra item --mem=100 must read key=value without dashes",
        ),
        ("name=..", "name='..' must be a non-empty folder name"),
        ("seed=-1", r"seed=-1 must be in \[0, 2\*\*32\)"),
        ("optim.beta1=2", "optim.beta1=2.0 and optim.beta2=0.999 must be in"),
        ("optim.weight_decay=-1", "optim.weight_decay, optim.head_weight_decay and optim.grad_clip must be >= 0"),
        ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
        ("slurm.mem_gb=-5", r"slurm.mem_gb=-5: GB per node, 0 \(the whole node\) or -1"),
        ("model.patch_size=-3", "model.img_size and model.patch_size must be >= 0"),
        ("data.channel_mean=0.1", "data.channel_mean/channel_std are used with data.norm=channels only"),
    ],
)
def test_validation_errors(override: str, message: str) -> None:
    cfg = apply_overrides(get_recipe("mnist_distarc"), [override])
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_bf16_at_zero_stage_0_is_refused_with_the_fix() -> None:
    """DeepSpeed's ZeRO-0 engine raises NotImplementedError ("unsupported mix of model_dtype=bf16 and
    grad_accum_dtype=fp32") at initialize: the config must refuse the mix before a job is queued."""
    base = get_recipe("mnist_distarc")
    with pytest.raises(ValueError, match="zero.bf16=true needs zero.stage>=1.*zero.stage=1.*zero.bf16=false"):
        apply_overrides(base, ["zero.bf16=true", "zero.stage=0"]).validate()
    for ok in (["zero.bf16=true", "zero.stage=1"], ["zero.bf16=false", "zero.stage=0"]):
        apply_overrides(base, ok).validate()


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
    clip = apply_overrides(
        get_recipe("vits_cub_chest_1gpu"),
        ["model.name=vit_base_patch16_clip_224.openai", "model.embed_dim=768", "data.num_classes=100"],
    ).resolved()
    assert clip.data.norm == "channels"
    mean, std = normalisation(clip.data)
    assert mean == list(timm.data.OPENAI_CLIP_MEAN) and std == list(timm.data.OPENAI_CLIP_STD)
    assert RunConfig.from_dict(clip.to_dict()) == clip and clip.resolved() == clip  # recorded as resolved
    with pytest.raises(ValueError, match="no pretrained config .* model.name='no_such_net'"):
        apply_overrides(get_recipe("vitl_imagenet_8gpu"), ["model.name=no_such_net"]).resolved()
    with pytest.raises(ValueError, match="resolved from model.name"):
        normalisation(get_recipe("vitl_imagenet_8gpu").data)  # unresolved: no silent default


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.norm=channels", "data.channel_mean=0.5,0.5", "data.channel_std=0.2,0.2,0.2"], "channel_mean"),
        (["data.norm=channels", "data.channel_mean=0.5,0.5,0.5", "data.channel_std=0.2,0,0.2"], "channel_std"),
        (["data.norm=channels", "data.channel_mean=nan,0.5,0.5", "data.channel_std=0.2,0.2,inf"], "channel_mean"),
        (["data.norm=timm", "data.in_chans=1", "model.in_chans=1"], "data.in_chans=1"),
        (["data.resize_backend=cv2"], "data.resize_backend"),
        (["data.uint8_batches=maybe"], "data.uint8_batches"),
    ],
)
def test_bad_normalisation_and_speed_settings(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_recipe("vitl_imagenet_8gpu"), overrides).resolved()


# The typed list fields: (override key, old text form, the typed value it means).
TEXT_FORMS = [
    ("metrics.recall_ks", "1, 2,4", (1, 2, 4)),
    ("metrics.eval_sets", "data-cache/faces-val:lfw+cfp_fp, /x", ("data-cache/faces-val:lfw+cfp_fp", "/x")),
    ("data.channel_mean", "0.48,0.46,0.41", (0.48, 0.46, 0.41)),
    ("data.channel_std", "0.27,0.26,0.28", (0.27, 0.26, 0.28)),
    ("data.sources", "data-cache/mnist5k=0.7,/a=b=0.3", (("data-cache/mnist5k", 0.7), ("/a=b", 0.3))),
    (
        "slurm.sbatch_extra",
        "constraint=a100; exclusive=true;comment=a=b",
        {"constraint": "a100", "exclusive": "true", "comment": "a=b"},
    ),
    ("slurm.setup", "module load cuda/12.4; source ~/env.sh;", ("module load cuda/12.4", "source ~/env.sh")),
]


def _field(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("key, text, value", TEXT_FORMS)
def test_list_fields_read_their_text_form(key: str, text: str, value, tmp_path) -> None:
    base = get_recipe("mnist_distarc")
    assert _field(apply_overrides(base, [f"{key}={text}"]), key) == value  # the CLI
    raw = base.to_dict()
    section, name = key.split(".")
    raw[section][name] = text  # a config.yaml written before the field was typed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert _field(load_yaml(str(tmp_path / "config.yaml")), key) == value
    assert _field(apply_overrides(base, [f"{key}="]), key) == type(value)()  # "" = unset, as before


def test_list_fields_read_native_yaml(tmp_path) -> None:
    raw = get_recipe("mnist_distarc").to_dict()
    raw["metrics"].update(recall_ks=[1, 10], eval_sets=["/f:lfw", "/g"])
    raw["data"].update(
        norm="channels",
        in_chans=3,
        channel_mean=[0.5, 1, 0.25],
        channel_std=[0.5, 0.5, 0.5],
        sources=[["data-cache/mnist5k", 2], ["/b", 0.5]],
    )
    raw["model"]["in_chans"] = 3
    raw["slurm"].update(sbatch_extra={"constraint": "a100", "exclusive": True, "mem": 100}, setup=["echo a; echo b"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_yaml(str(path))
    assert cfg.metrics.recall_ks == (1, 10) and cfg.metrics.eval_sets == ("/f:lfw", "/g")
    assert cfg.data.channel_mean == (0.5, 1.0, 0.25) and isinstance(cfg.data.channel_mean[1], float)
    assert cfg.data.sources == (("data-cache/mnist5k", 2.0), ("/b", 0.5))
    assert cfg.slurm.sbatch_extra == {"constraint": "a100", "exclusive": "true", "mem": "100"}
    assert cfg.slurm.setup == ("echo a; echo b",)  # a list item is one line, ";" and all
    # submitit's form: "true" is a bare flag, dashes in option names become underscores
    assert cfg.slurm.extra_parameters() == {"constraint": "a100", "exclusive": True, "mem": "100"}
    assert dataclasses.replace(cfg.slurm, sbatch_extra={"mail-type": "END"}).extra_parameters() == {"mail_type": "END"}
    raw["data"]["sources"] = {"data-cache/mnist5k": 2, "/b": 0.5}  # a mapping keeps its order
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_yaml(str(path)).data.sources == (("data-cache/mnist5k", 2.0), ("/b", 0.5))
    cfg.validate()
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "section, name, value, message",
    [
        ("metrics", "recall_ks", [1, "x"], r"metrics.recall_ks=\[1, 'x'\]: item 'x' must read an integer"),
        ("metrics", "recall_ks", [1, True], "item True must read an integer"),
        ("metrics", "recall_ks", {"a": 1}, "item {'a': 1} must read an integer"),
        ("data", "sources", [["/a"]], r"data.sources=\[\['/a'\]\]: item \['/a'\] must read ROOT=WEIGHT"),
        ("data", "sources", [["/a", "heavy"]], "must read ROOT=WEIGHT"),
        ("data", "channel_std", ["0.5", None], "item None must read a number"),
        (
            "slurm",
            "sbatch_extra",
            ["constraint"],
            "item 'constraint' must read key=value without dashes.*a YAML mapping",
        ),
        ("slurm", "setup", [["echo"]], r"item \['echo'\] must read a shell line"),
    ],
)
def test_list_fields_reject_bad_yaml(section: str, name: str, value, message: str) -> None:
    raw = get_recipe("mnist_distarc").to_dict()
    raw[section][name] = value
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(raw)


def test_typed_fields_round_trip_through_yaml(tmp_path) -> None:
    cfg = apply_overrides(
        get_recipe("vitl_imagenet_8gpu"),
        [f"{key}={text}" for key, text, _ in TEXT_FORMS]
        + ["data.norm=channels", "data.sources=data-cache/imagenet=0.7,/a=b=0.3"],
    ).validate()
    save_yaml(cfg, str(tmp_path / "config.yaml"))
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["metrics"]["recall_ks"] == [1, 2, 4]  # tuples are written as YAML lists
    assert written["data"]["sources"] == [["data-cache/imagenet", 0.7], ["/a=b", 0.3]]
    assert load_yaml(str(tmp_path / "config.yaml")) == cfg and RunConfig.from_dict(cfg.to_dict()) == cfg
    # the override text reads back to the same value (older checkpoints recorded data.sources as this text)
    assert override_text(cfg.data.sources) == "data-cache/imagenet=0.7,/a=b=0.3"
    assert override_text((("/a", 1.0),)) == "/a=1" and override_text({"exclusive": "true"}, ";") == "exclusive=true"
    for key, _, _ in TEXT_FORMS:
        sep = ";" if key.startswith("slurm.") else ","
        assert apply_overrides(cfg, [f"{key}={override_text(_field(cfg, key), sep)}"]) == cfg


def test_validation_runs_once_per_config_value(monkeypatch) -> None:
    # counted: ModelConfig.validate (a part of RunConfig.validate) and data.config._check_int (inside
    # DataConfig.validate, which the loaders call on their own)
    calls: list[str] = []
    model_validate = ModelConfig.validate
    monkeypatch.setattr(ModelConfig, "validate", lambda self: (calls.append("model"), model_validate(self))[1])
    monkeypatch.setattr(data.config, "_check_int", lambda *args, **kwargs: calls.append("data"))
    cfg = apply_overrides(get_recipe("mnist_distarc"), ["data.seed=12345"])  # a value no other test checked
    resolved = cfg.resolved()
    assert calls.count("model") == 1 and calls.count("data") > 0
    checked = len(calls)
    assert resolved.resolved() is resolved and resolved.validate() is resolved
    resolved.data.validate()  # what build_train_loader calls
    assert len(calls) == checked  # nothing checked twice
    apply_overrides(cfg, ["data.seed=12346"]).validate()  # another value is checked again
    assert calls.count("model") == 2 and len(calls) == 2 * checked
    bad = apply_overrides(cfg, ["zero.stage=5"])
    for _ in range(2):  # a failure is never remembered
        with pytest.raises(ValueError, match="zero.stage=5"):
            bad.validate()


def test_curvature_and_clip_radius_that_saturate_the_poincare_distance_are_refused() -> None:
    """sqrt(c) * clip_radius past 3.0 nears the fp32 artanh clamp (model.hyperbolic): at c = 3, r = 2.3 every
    far pair got distance 8.37 (true 9.0-9.2) and no gradient. The paper's c = 0.5, r = 2.3 (1.63) passes."""
    from model.config import ChestConfig

    ChestConfig().validate("chest")
    with pytest.raises(ValueError, match=r"sqrt\(c\) \* r = 3\.98 > 3\.0.*clip radius to <= 1\.73"):
        ChestConfig(curvature=3.0).validate("chest")
    ChestConfig(curvature=3.0, clip_radius=1.7).validate("chest")


def test_yaml_errors_name_the_file_and_refuse_what_yaml_would_change(tmp_path) -> None:
    """A key given twice (PyYAML keeps the last) and a missing key without a default are refused, naming the
    file; numbers are typed by the field, so text fields keep what YAML 1.1 would have read as numbers."""
    good = get_recipe("mnist_distarc").to_dict()
    path = tmp_path / "run.yaml"
    cases = [
        (yaml.safe_dump(good).replace("  lr: ", "  lr: 0.5\n  lr: "), r"key\(s\) \['lr'\] given twice"),
        (yaml.safe_dump({k: v for k, v in good.items() if k != "name"}), r"config key\(s\) \['name'\] missing"),
        ("- a list\n", "config: expected a mapping"),
        (yaml.safe_dump(good).replace("max_steps: ", "max_steps: 0x"), "max_steps='0x.*' is not a valid int"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=f"^{path}: .*{message}"):
            load_yaml(str(path))
    path.write_text(yaml.safe_dump(good))
    assert load_yaml(str(path)) == get_recipe("mnist_distarc")
    # text fields keep the text as written: YAML 1.1 reads 010 as 8 and 10:30 as 630
    text = yaml.safe_dump(good).replace("partition: ''", "partition: 010")
    path.write_text(text.replace("sbatch_extra: {}", "sbatch_extra:\n    begin: 10:30\n    mem: 100"))
    slurm = load_yaml(str(path)).slurm
    assert slurm.partition == "010" and slurm.sbatch_extra == {"begin": "10:30", "mem": "100"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_raise_no_warnings(name: str) -> None:
    assert get_recipe(name).validate().warnings() == []


def test_warmup_longer_than_the_run_is_pointed_out(capsys) -> None:
    from launch.__main__ import main

    cfg = apply_overrides(get_recipe("mnist_distarc"), ["max_steps=40", "optim.warmup_steps=50"]).validate()
    (line,) = cfg.warnings()
    assert "optim.warmup_steps=50 >= max_steps=40" in line and "peak at 80% of optim.lr" in line
    assert apply_overrides(cfg, ["optim.warmup_steps=39"]).validate().warnings() == []
    assert main(["--print-config", "max_steps=40", "optim.warmup_steps=50"]) == 0  # runs, but says so
    assert "warning: optim.warmup_steps=50 >= max_steps=40" in capsys.readouterr().err


def test_baselines_with_the_papers_defaults_of_other_heads_are_refused_or_pointed_out() -> None:
    """DistArc's s = 1 and CHEST's distance-unit constants are the defaults; the baselines need their own."""
    base = get_recipe("mnist_chest")
    with pytest.raises(ValueError, match="delta_e=5 >= 2 puts every class above the true one.*gamma_e=0.1"):
        apply_overrides(base, ["loss.name=softtriple"]).validate()
    (line,) = apply_overrides(base, ["loss.name=softtriple", "loss.chest.delta_e=0.01"]).validate().warnings()
    assert "loss.chest.gamma_e=5" in line and "gamma_e=0.1" in line
    for name in ("arcface", "cosface"):
        (line,) = (
            apply_overrides(get_recipe("mnist_distarc"), [f"loss.name={name}", "loss.scale=1"]).validate().warnings()
        )
        assert f"loss.name={name} with loss.scale=1" in line and "loss.scale=64" in line
        assert (
            apply_overrides(get_recipe("mnist_distarc"), [f"loss.name={name}", "loss.scale=30"]).validate().warnings()
            == []
        )


def test_unclipped_poincare_features_are_pointed_out() -> None:
    (line,) = apply_overrides(get_recipe("mnist_chest"), ["loss.chest.clip_radius=0"]).validate().warnings()
    assert "loss.chest.clip_radius=0" in line and "fp32" in line
    # clipped near the edge (accepted up to sqrt(c) r = 3, where the artanh clamp starts): fp32 distances are off
    (line,) = apply_overrides(get_recipe("mnist_chest"), ["loss.chest.clip_radius=2.9"]).validate().warnings()
    assert "loss.chest.clip_radius=2.9" in line and "sqrt(c) r = 2.05" in line and "fp32" in line
    assert apply_overrides(get_recipe("mnist_chest"), ["loss.chest.clip_radius=2.8"]).validate().warnings() == []


def test_euclidean_only_chest_on_backbone_features_is_pointed_out() -> None:
    base = get_recipe("mnist_chest")
    (line,) = apply_overrides(base, ["loss.chest.eta_h=0"]).validate().warnings()
    assert "add loss.chest.euclid_features=head" in line
    assert apply_overrides(base, ["loss.chest.eta_h=0", "loss.chest.euclid_features=head"]).validate().warnings() == []


def test_signal_delays_submitit_or_slurm_would_not_requeue_are_pointed_out() -> None:
    """No signal before the time limit: the job ends TIMEOUT and never comes back (seen on the local cluster);
    a delay beyond submitit's guaranteed walltime (min(0.8 T, T - 10 min)): the time limit's USR2 reads as a
    preemption, whose requeues nothing caps."""
    base = get_recipe("mnist_distarc")
    (line,) = apply_overrides(base, ["slurm.signal_delay_s=0"]).validate().warnings()
    assert "ends TIMEOUT" in line and "not requeued" in line
    (line,) = apply_overrides(base, ["slurm.time_min=60", "slurm.signal_delay_s=900"]).validate().warnings()
    assert "takes the time limit's signal for a preemption" in line
    for ok in (["slurm.time_min=60", "slurm.signal_delay_s=600"], ["slurm.time_min=600", "slurm.signal_delay_s=1200"]):
        assert apply_overrides(base, ok).validate().warnings() == []

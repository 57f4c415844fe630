"""The launcher's use of the memory estimate: a GPU submission (Slurm or local) that cannot fit is refused with
the fixes, ordered by what they save; trunks whose `blocks` are stages are measured whole."""

from __future__ import annotations

import os
import re

from launch import estimate as est
from launch import trunk_memory as tm
from launch.__main__ import build_config, main
from model.config import ModelConfig


def test_a_submission_that_cannot_fit_is_refused_with_the_fixes(tmp_path, capsys, monkeypatch) -> None:
    def no_submission(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr("launch.__main__.make_executor", no_submission)
    args = ["--recipe", "mnist_distarc", f"run_root={tmp_path}", "slurm.gpus_per_node=2"]
    assert main(["--slurm", "--gpu-mem-gib", "1", *args]) == 2
    err = capsys.readouterr().err
    assert "needs an estimated" in err and "more than the 1 GiB of one GPU (--gpu-mem-gib)" in err
    assert "no Slurm here" not in err
    for fix in ("zero.stage=3", "more GPUs", "model.grad_checkpointing=true", "data.batch_size", "zero.bf16=true"):
        assert fix in err, fix
    assert "loss.class_chunk" not in err  # 10 classes: a chunk of 8192 would save nothing
    assert "loss.sample_rate" not in err  # nor Partial FC (it changes the loss: offered where it saves 5%)
    assert "optim.head_optimizer=sgd" not in err  # nor SGD's one momentum row instead of two
    # GPUs asked for in slurm.sbatch_extra count as GPUs (the check had passed such a run over)
    gres = [*args[:-1], "slurm.gpus_per_node=0", "slurm.sbatch_extra=gres=gpu:2"]
    assert main(["--slurm", "--gpu-mem-gib", "1", *gres]) == 2
    assert "needs an estimated" in capsys.readouterr().err
    assert main(["--slurm", "--gpu-mem-gib", "1", *args, "data.num_classes=200000"]) == 2
    err = capsys.readouterr().err
    assert "loss.class_chunk=8192" in err  # 100,000 classes per rank
    assert "loss.sample_rate=0.1 (Partial FC" in err  # its saving at its own rate
    assert "optim.head_optimizer=sgd" not in err  # the logits dominate: the table's state is 2% of the peak
    big_table = [*args, "data.num_classes=4000000", "loss.class_chunk=1024"]  # chunked: the table is the peak
    assert main(["--slurm", "--gpu-mem-gib", "1", *big_table]) == 2
    assert "optim.head_optimizer=sgd" in capsys.readouterr().err
    assert main(["--estimate", "--gpu-mem-gib", "1", *big_table, "optim.head_optimizer=sgd"]) == 1
    out = capsys.readouterr().out
    assert "head shard x 12 B (fp32 weight, sgd state, grad)" in out and "head_optimizer=sgd" not in out
    assert "lazy_" not in out  # exact (sample rate 1): nothing to update lazily
    # Partial FC at 20M classes: the lazy updates drop the table-sized gradient (10% of the table's 16 B x D)
    sampled = [*args, "data.num_classes=20000000", "loss.class_chunk=1024", "loss.sample_rate=0.1"]
    assert main(["--estimate", "--gpu-mem-gib", "1", *sampled]) == 1
    out = capsys.readouterr().out
    assert "optim.head_optimizer=lazy_adamw" in out and "optim.head_optimizer=sgd" in out
    assert main(["--estimate", "--gpu-mem-gib", "1", *sampled, "optim.head_optimizer=lazy_sgd"]) == 1
    out = capsys.readouterr().out
    assert "head shard x 8.4 B (fp32 weight, lazy_sgd state, grad)" in out and "head_optimizer=" not in out
    assert main(["--estimate", "--gpu-mem-gib", "1", *args]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["--estimate", *args]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "ranks 0-1" in out
    assert "trunk states, ZeRO-2 fp32 (closed form fitted to DeepSpeed's engines)" in out
    assert main(["--estimate", "--gpu-mem-gb", "0", *args]) == 2
    assert "--gpu-mem-gib=0 must be > 0" in capsys.readouterr().err


def test_a_local_gpu_run_is_checked_against_the_machines_gpus(tmp_path, capsys, monkeypatch) -> None:
    """Without --slurm a run with GPUs is checked against the smallest GPU nvidia-smi reports (MiB), or
    --gpu-mem-gib where given; without nvidia-smi (this machine) it is not checked."""

    def no_submission(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr("launch.__main__.make_executor", no_submission)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 81559\necho 1024\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert est.local_gpu_mem_gib() == 1.0
    args = ["--recipe", "mnist_distarc", f"run_root={tmp_path}", "slurm.gpus_per_node=2"]
    assert main(args) == 2
    assert "more than the 1 GiB of one GPU (nvidia-smi)" in capsys.readouterr().err
    monkeypatch.setenv("PATH", "/nonexistent")
    assert est.local_gpu_mem_gib() is None


def test_cnn_trunks_with_stages_named_blocks_are_measured_whole(capsys) -> None:
    """EfficientNet's and MobileNetV3's `blocks` are stages built from an arch string: extrapolating over them
    passed `depth=` to a constructor that has none (TypeError at --estimate and at every GPU submission)."""
    cfg = ModelConfig(name="mobilenetv3_small_050", embed_dim=64, in_chans=1)
    size = tm.trunk_size(cfg)
    assert size.depth == 0 and tm.trunk_size(ModelConfig(name="vit_tiny_patch16_224", embed_dim=64)).depth == 12
    assert "measured on the full trunk" in tm.activations(cfg, 32, size).how
    assert main(["--estimate", "--recipe", "mnist_distarc", "model.name=mobilenetv3_small_050"]) == 0
    assert "fits" in capsys.readouterr().out


def test_fixes_offer_a_smaller_bucket_and_say_what_more_gpus_leave_whole() -> None:
    """ViT-L on 8 GPUs: DeepSpeed's bucket (1.86 GiB) exceeds the trunk states (1.20 GiB); bf16 ZeRO-2 keeps its
    2 B/param bf16 weights whole on every rank, which more GPUs do not shrink."""
    cfg = build_config("vitl_imagenet_8gpu", [])
    plan = est.estimate(cfg, 4)
    assert plan.most("bucket") > plan.most("states") and not plan.fits
    text = est.fixes(cfg, plan)
    assert "zero.reduce_bucket_size, e.g. 125000000" in text and "1.86 GiB gradient bucket" in text
    assert "communication efficiency" in text
    size = tm.trunk_size(cfg.model)
    whole = size.params * 2 + 6 * size.largest_layer
    assert f"the {est._size(whole)} of bf16 weights, a layer-sized temporary held whole on every rank" in text
    assert "of head shard and partitioned trunk states shrink as 1/ranks" in text
    assert "of trunk states and head shard shrink as 1/ranks" not in text  # the bf16 weights do not
    small = build_config("vitl_imagenet_8gpu", ["zero.reduce_bucket_size=10000000"])  # 38 MiB: < 5% of the peak
    assert "reduce_bucket_size" not in est.fixes(small, est.estimate(small, 4))


KEPT_SETTINGS = ("stage3_max_reuse_distance", "stage3_max_live_parameters")


def test_fixes_offer_zero3_fewer_kept_weights() -> None:
    """ViT-L at ZeRO-3 on 64 GPUs keeps all its 304 M weights gathered from the forward to the backward (0.57 GiB
    in bf16, more than its partitioned states): the fixes offer a quarter, and those settings lower the states."""
    cfg = build_config("vitl_imagenet_8gpu", ["zero.stage=3", "slurm.nodes=8"])
    plan = est.estimate(cfg, 4)
    text = est.fixes(cfg, plan)
    found = re.search(r"zero.stage3_max_reuse_distance=(\d+) and zero.stage3_max_live_parameters=(\d+)", text)
    assert found and found[1] == found[2] == "75000000", text
    assert "keeps 304 M gathered parameters" in text
    lowered = build_config(
        "vitl_imagenet_8gpu", ["zero.stage=3", "slurm.nodes=8", *(f"zero.{k}=75000000" for k in KEPT_SETTINGS)]
    )
    after = est.estimate(lowered, 4)
    # bf16 bytes of what is no longer kept (with leaf blocks the reuse distance keeps 75 M and a block of 12.6 M)
    assert plan.most("states") - after.most("states") >= 2 * (303_800_000 - 75_000_000 - 12_600_000)
    assert "stage3_max_reuse_distance" not in est.fixes(lowered, after)  # a quarter of those is < 5% of the peak
    two = build_config("vitl_imagenet_8gpu", ["zero.stage=2", "slurm.nodes=8"])
    assert "stage3_max_reuse_distance" not in est.fixes(two, est.estimate(two, 4))


def test_fixes_leave_out_a_zero_stage_that_holds_more() -> None:
    """fp32 ZeRO-1 on one rank holds 24 B/param (fp32 master copy, second gradient) against ZeRO-0's 16, and a
    bucket: not a fix. On 8 ranks it holds 6.5 B/param: one."""
    one = build_config("mnist_distarc", ["zero.stage=0", "slurm.tasks_per_node=1", "zero.reduce_bucket_size=1000"])
    assert "zero.stage=1" not in est.fixes(one, est.estimate(one, 0.001))
    eight = build_config("mnist_distarc", ["zero.stage=0", "slurm.tasks_per_node=8", "zero.reduce_bucket_size=1000"])
    assert "zero.stage=1 (the trunk's states and gradient bucket" in est.fixes(eight, est.estimate(eight, 0.001))


def test_unfused_adamw_temporaries_are_counted_and_fused_is_offered() -> None:
    """optim.fused=false runs torch's unfused AdamW, whose step holds fp32 temporaries (on GPUs the foreach form's,
    4 B per value stepped; tests/test_estimate.py measures both forms): the plan counts them beyond what the
    backward freed, offers optim.fused=true, and a fix that frees backward memory saves only what that memory
    exceeds them by (it offered a lower batch size for 1.46 GiB that left the peak where it was)."""
    overrides = ["data.num_classes=8000000", "loss.class_chunk=8192", "slurm.nodes=1", "data.batch_size=32"]
    fused = build_config("vitl_ms1mv2_faces", overrides)
    unfused = build_config("vitl_ms1mv2_faces", [*overrides, "optim.fused=false"])
    plan, slow = est.estimate(fused, 80), est.estimate(unfused, 80)
    assert "step" not in plan.rows and not plan.step_temporaries
    assert plan.totals == [t - s for t, s in zip(slow.totals, slow.rows["step"][1])]
    (shard, *_) = est.head_shards(unfused.loss, 8_000_000, 512, 8, "adamw")
    freed = sum(slow.rows[key][1][0] for key in ("activations", "logits", "graph"))
    assert slow.step_temporaries[0] == 4 * shard.sharded_values  # the head's 1M x 512 table on a GPU: 1.9 GiB
    assert slow.rows["step"][1][0] == 4 * shard.sharded_values - freed > 0
    assert est._freed_saving(slow, 10**9) == 0 and est._freed_saving(plan, 10**9) == 10**9
    tight = est.fixes(unfused, est.estimate(unfused, 4))
    assert "optim.fused=true" in tight and "optim.fused" not in est.fixes(fused, est.estimate(fused, 4))
    assert tight.index("optim.fused=true") < tight.index("a lower data.batch_size")  # which saves nothing here
    # half the classes at the recipe's batch: the backward frees more than the step allocates; a fix saves only
    # the difference
    half = ["data.num_classes=4000000", *overrides[1:-1], "optim.fused=false"]
    wide = est.estimate(build_config("vitl_ms1mv2_faces", half), 80)
    room = sum(wide.rows[key][1][0] for key in ("activations", "logits", "graph")) - wide.step_temporaries[0]
    assert wide.most("step") == 0 and 0 < room and est._freed_saving(wide, 10**12) == room
    sgd = build_config("vitl_ms1mv2_faces", [*overrides, "optim.fused=false", "optim.head_optimizer=sgd"])
    params = tm.trunk_size(sgd.model).params  # SGD holds none: the trunk's ZeRO-2 partition's alone
    assert est.estimate(sgd, 80).step_temporaries[0] == int(4 * params / 8)

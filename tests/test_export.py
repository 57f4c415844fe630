"""Export: the consolidated fp32 backbone loads into timm by checkpoint_path and computes the trained
embeddings; the proxy table comes out whole, in class order, whatever the world size."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import timm
import numpy as np
import torch

from launch.__main__ import build_config
from model.backbone import build_backbone
from model.chest import ChestHead
from tests.test_train import small_overrides
from train.checkpoint import find_latest
from train.export import export
from train.export import main as export_main


def _train(overrides: list[str], recipe: str = "mnist_chest") -> dict:
    from train.main import run

    return run(build_config(recipe, overrides)).to_json()


@pytest.mark.parametrize("stage", [2, 3])
def test_export_loads_in_timm_and_holds_the_whole_table(dist_pool, mnist_root: str, tmp_path, stage: int) -> None:
    pool = dist_pool(2)
    args = small_overrides(mnist_root, str(tmp_path), "exp", 6) + [f"zero.stage={stage}", "metrics.retrieval=false"]
    pool.run(_train, args)
    run_dir = str(tmp_path / "exp")
    out = os.path.join(run_dir, "export")  # written at the end of training
    info = json.load(open(os.path.join(out, "export.json")))
    assert info["step"] == 6 and info["model_name"] == "test_resnet" and info["num_classes"] == 10
    model = timm.create_model(
        info["model_name"], checkpoint_path=os.path.join(out, "backbone.pth"), **info["timm_kwargs"]
    )
    # the reference: the run's own module state as the engine saved it (fp32 training, rank 0's file)
    latest = find_latest(run_dir)
    cfg = build_config("mnist_chest", args)
    reference = build_backbone(cfg.model)
    torch.manual_seed(cfg.seed)  # the run's initial weights, to show the export holds trained ones
    initial = build_backbone(cfg.model).eval()
    model.eval(), reference.eval()
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(model(images), initial.trunk(images))
        if stage == 2:  # ZeRO-1/2 also save the full fp32 module state: the export must equal it
            module = torch.load(os.path.join(latest, "engine", "mp_rank_00_model_states.pt"), weights_only=False)[
                "module"
            ]
            reference.load_state_dict(module)
            assert torch.equal(model(images), reference.trunk(images))
    # (ZeRO-3 saves only placeholders there; its consolidation is DeepSpeed's zero_to_fp32, checked here
    # only through timm loading it and the model differing from the initial one)
    assert export(run_dir, out_dir=str(tmp_path / "again")) == str(tmp_path / "again")
    # --checkpoint takes a step-N name as train.evaluate does (a path worked before, the name did not)
    assert export_main([run_dir, "--checkpoint", "step-6", "--out", str(tmp_path / "named")]) == 0
    assert json.load(open(tmp_path / "named" / "export.json"))["checkpoint"] == os.path.abspath(latest)
    with pytest.raises(FileNotFoundError, match=r"step-99 is not a complete checkpoint.*step-6"):
        export(run_dir, "step-99")
    head = torch.load(os.path.join(out, "head.pt"))
    assert head["proxies"].shape[0] == 10 and "fc.weight" in head  # CHEST: [C, K, D] proxies + the shared FC
    rows = torch.zeros_like(head["proxies"])  # the table as the ranks hold it: CHEST shuffles its rows
    for file in glob.glob(os.path.join(latest, "head", "classes-*.pt")):
        part = torch.load(file, weights_only=False)
        start, n = part["class_start"], part["num_local"]
        rows[start : start + n] = part["params"]["proxies"]["value"]
    label_to_row = ChestHead(cfg.loss, 10, cfg.model.embed_dim).class_perm
    assert not torch.equal(label_to_row, torch.arange(10))
    assert torch.equal(head["proxies"], rows[label_to_row])  # row j of the export = class j
    assert info["head_rows"] == "class_id" and info["class_tables"] == ["proxies"]
    assert info["input"] == {
        **{"image_size": 28, "in_chans": 1, "mean": [0.5], "std": [0.5]},
        **{"resize": [28, 28], "center_crop": None, "interpolation": "bilinear"},  # the digits' square resize
    }
    # the neck alone: DeepSpeed's ZeRO-1/2 reader hands out views of one flat buffer, and neck.pth held all of it
    neck_bytes = sum(v.numel() * v.element_size() for v in torch.load(os.path.join(out, "neck.pth")).values())
    assert os.path.getsize(os.path.join(out, "neck.pth")) < neck_bytes + 4096 or not neck_bytes
    if stage == 3:  # rank 0's model states missing: its BatchNorm statistics came from rank 1's file, silently
        broken = str(tmp_path / "broken")
        shutil.copytree(latest, broken)
        os.remove(os.path.join(broken, "engine", "zero_pp_rank_0_mp_rank_00_model_states.pt"))
        with pytest.raises(FileNotFoundError, match="lacks zero_pp_rank_0_mp_rank_00_model_states.pt .* 2 ranks"):
            export(run_dir, broken, str(tmp_path / "from_broken"))


def test_a_broken_checkpoint_leaves_the_previous_export_whole(dist_pool, mnist_root: str, tmp_path, capsys) -> None:
    """A head file missing (the last classes) or unreadable: the export stops with the reason and the folder
    still holds the previous export, not a mix of two checkpoints."""
    pool = dist_pool(2)
    pool.run(_train, small_overrides(mnist_root, str(tmp_path), "exp", 4) + ["metrics.retrieval=false"])
    run_dir = str(tmp_path / "exp")
    out = os.path.join(run_dir, "export")
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    broken = str(tmp_path / "broken")
    shutil.copytree(find_latest(run_dir), broken)
    shards = sorted(glob.glob(os.path.join(broken, "head", "classes-*.pt")))
    os.remove(shards[-1])
    with pytest.raises(RuntimeError, match=r"classes \[5, 10\) are missing"):
        export(run_dir, broken)
    shutil.copytree(find_latest(run_dir), broken, dirs_exist_ok=True)
    os.remove(os.path.join(broken, "head", "replicated.pt"))  # CHEST's FC: exported without it, embed failed later
    with pytest.raises(FileNotFoundError, match="replicated.pt .*shared FC.* is missing"):
        export(run_dir, broken)
    from train.evaluate.standalone import load_run  # train.evaluate / train.embed --checkpoint: the same check

    with pytest.raises(FileNotFoundError, match="replicated.pt .*shared FC.* is missing"):
        load_run(run_dir, broken)
    shutil.copytree(find_latest(run_dir), broken, dirs_exist_ok=True)
    with open(shards[-1], "r+b") as f:
        f.truncate(100)
    assert export_main([run_dir, "--checkpoint", broken]) == 2
    assert f"error: {shards[-1]} cannot be read" in capsys.readouterr().err
    shutil.copytree(find_latest(run_dir), broken, dirs_exist_ok=True)
    with open(os.path.join(broken, "engine", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), "r+b") as f:
        f.truncate(1000)  # torch's own message ("PytorchStreamReader failed ...") named no file and no fix
    assert export_main([run_dir, "--checkpoint", broken]) == 2
    err = capsys.readouterr().err
    assert f"{os.path.join(broken, 'engine')} cannot be read" in err and "--checkpoint step-M" in err
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
    assert not [name for name in os.listdir(run_dir) if ".writing-" in name or ".replaced-" in name]


def test_out_replaces_only_an_earlier_export(dist_pool, mnist_root: str, tmp_path, capsys) -> None:
    """--out renamed the folder it named aside and deleted it whatever it held: `--out RUN_DIR` deleted the run
    (checkpoints, TensorBoard), `--out runs` every run."""
    dist_pool(1).run(_train, small_overrides(mnist_root, str(tmp_path), "da", 2), "mnist_distarc")
    run_dir = str(tmp_path / "da")
    before = sorted(os.listdir(run_dir))
    for folder in (run_dir, str(tmp_path)):
        assert export_main([run_dir, "--out", folder]) == 2
        assert "which an export does not write: it would be deleted" in capsys.readouterr().err
    assert sorted(os.listdir(run_dir)) == before
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "other_model.pt").write_bytes(b"mine")
    assert export_main([run_dir, "--out", str(mine)]) == 2 and (mine / "other_model.pt").read_bytes() == b"mine"
    capsys.readouterr()
    assert export_main([run_dir, "--out", os.path.join(run_dir, "export")]) == 0  # an earlier export: replaced
    assert (tmp_path / "empty").mkdir() is None and export_main([run_dir, "--out", str(tmp_path / "empty")]) == 0


def test_a_distarc_export_holds_the_radii_of_its_predictive_measure(dist_pool, mnist_root: str, tmp_path) -> None:
    """argmin_j ||x - r_j w_j / ||w_j|| || from head.pt alone (model.distarc.predict(x, weight, radii)): the table
    and each class's sphere radius, r_0 + g (j mod S)."""
    args = small_overrides(mnist_root, str(tmp_path), "da", 2)
    dist_pool(1).run(_train, args, "mnist_distarc")
    cfg = build_config("mnist_distarc", args)
    head = torch.load(os.path.join(cfg.run_dir, "export", "head.pt"))
    loss = cfg.loss
    assert head["weight"].shape[0] == 10 and loss.num_spheres > 1
    assert torch.equal(head["radii"], loss.radius_start + loss.radius_gap * (torch.arange(10) % loss.num_spheres))


def test_embed_skips_bad_images_keeps_an_earlier_output_and_takes_any_split(
    dist_pool, mnist_root: str, tmp_path, capsys, monkeypatch
) -> None:
    """train.embed: an undecodable file among --images stopped it with a traceback naming no file; a kill or full
    disk while saving cut the earlier output short; --shards refused a split smaller than the run's Recall@K
    (which embed cannot override); a bad --out failed only after all the embedding."""
    from PIL import Image

    from train.embed import main as embed

    args = small_overrides(mnist_root, str(tmp_path), "da", 2) + ["metrics.recall_ks=2000"]  # val: 1000 images
    dist_pool(1).run(_train, args, "mnist_distarc")
    run_dir = str(tmp_path / "da")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("L", (28, 28), 40 * i).save(folder / f"{i}.png")
    (folder / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    out = str(tmp_path / "emb.pt")
    assert embed([run_dir, "--images", str(folder), "--out", out, "--device", "cpu"]) == 0
    saved = torch.load(out, weights_only=False)
    assert [os.path.basename(k) for k in saved["keys"]] == ["0.png", "1.png"] and saved["embeddings"].shape[0] == 2
    assert len(saved["skipped"]) == 1 and "zz_bad.png" in saved["skipped"][0]
    assert "skipped" in capsys.readouterr().err
    before = open(out, "rb").read()

    def dies_mid_write(obj, f, *a, **k):
        f.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space"):
        embed([run_dir, "--images", str(folder), "--out", out, "--device", "cpu"])
    monkeypatch.undo()
    assert open(out, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["da", "emb.pt", "imgs"]
    assert embed([run_dir, "--shards", mnist_root, "--split", "val", "--out", out, "--device", "cpu"]) == 0
    assert torch.load(out, weights_only=False)["embeddings"].shape[0] == 1000
    assert embed([run_dir, "--images", str(folder), "--out", str(tmp_path / "no" / "e.pt"), "--device", "cpu"]) == 2
    assert "must name a file in an existing folder" in capsys.readouterr().err
    # the Python API on an opened 16-bit image sees what training sees (PIL's convert clipped it at 255: white)
    from data.transforms import decode_image
    from train.embed import load_embedder

    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 28), (28, 1)).astype(np.uint16))
    ramp.save(folder / "deep.png")
    embedder = load_embedder(run_dir)
    trained_view = embedder.transform(decode_image((folder / "deep.png").read_bytes(), 1))
    torch.testing.assert_close(embedder.transform(Image.open(folder / "deep.png")), trained_view, rtol=0, atol=0)


def test_an_export_killed_mid_write_is_cleaned_up_by_the_next(dist_pool, mnist_root: str, tmp_path) -> None:
    """A staging folder named by a dead process's id stayed for good (GBs for a ViT-L); killed between its two
    renames, the previous export goes back in place."""
    import socket
    import subprocess

    dist_pool(1).run(_train, small_overrides(mnist_root, str(tmp_path), "da", 2), "mnist_distarc")
    run_dir = str(tmp_path / "da")
    out = os.path.join(run_dir, "export")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    shutil.copytree(out, f"{out}.writing-{host}-{dead.pid}")
    os.rename(out, f"{out}.replaced-{host}-{dead.pid}")  # killed after moving the old export aside
    export(run_dir, out_dir=str(tmp_path / "elsewhere"))  # another --out: this one's leftovers are left
    assert os.path.isdir(f"{out}.writing-{host}-{dead.pid}") and not os.path.exists(out)
    alive = f"{out}.writing-{host}-{os.getppid()}"  # a live process's: an export running now
    os.makedirs(alive)
    elsewhere = f"{out}.writing-othernode-{dead.pid}"  # another node's live export: its pid means nothing here
    os.makedirs(elsewhere)
    longer = f"{out}.writing-{host}-2-{dead.pid}"  # a node whose name starts with this one's
    os.makedirs(longer)
    export(run_dir)
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("export")) == sorted(
        [
            "export",
            f"export.writing-{host}-{os.getppid()}",
            f"export.writing-othernode-{dead.pid}",
            f"export.writing-{host}-2-{dead.pid}",
        ]
    )
    shutil.rmtree(alive)


def test_a_bf16_zero1_run_exports_its_fp32_master_weights(dist_pool, mnist_root: str, tmp_path) -> None:
    """bf16 at ZeRO-1 runs DeepSpeed's BF16_Optimizer, whose bf16_zero_pp_rank_* files zero_to_fp32 refuses: every
    such run failed at its end-of-training export (no summary.json, and each requeue evaluated and failed again)."""
    args = small_overrides(mnist_root, str(tmp_path), "bf", 4) + ["zero.stage=1", "zero.bf16=true"]
    summary = dist_pool(2).run(_train, args, "mnist_distarc")[0]
    assert summary["step"] == 4
    run_dir = str(tmp_path / "bf")
    exported = torch.load(os.path.join(run_dir, "export", "backbone.pth"))
    module = torch.load(os.path.join(find_latest(run_dir), "engine", "mp_rank_00_model_states.pt"), weights_only=False)
    trunk = {k[len("trunk.") :]: v for k, v in module["module"].items() if k.startswith("trunk.")}
    assert exported.keys() == trunk.keys()
    weights = [k for k, v in trunk.items() if v.dtype == torch.bfloat16]
    assert weights and all(exported[k].dtype == torch.float32 for k in weights)
    for k in weights:  # the fp32 masters, which the module's bf16 copies round
        torch.testing.assert_close(exported[k].bfloat16(), trunk[k], rtol=0, atol=0)
    assert any(not torch.equal(exported[k], trunk[k].float()) for k in weights)  # more precise than the bf16 copy
    counters = [k for k, v in trunk.items() if not v.is_floating_point()]  # BatchNorm's num_batches_tracked
    assert counters and all(torch.equal(exported[k], trunk[k]) for k in counters)

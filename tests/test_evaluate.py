"""Every protocol end to end on tiny copies of the published layouts: converter -> a few training steps
(2 gloo ranks) -> `python -m train.evaluate` -> the row printed and eval_<set>.json; the numbers equal a
direct call of the metric on the same embeddings; 1 and 2 evaluation processes agree; bad input stops
before anything is embedded."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data.convert.__main__ import main as convert
from data.convert.verification import read_bin
from data.transforms import decode_image
from tests import layouts
from train.evaluate.__main__ import main as evaluate_cli
from train.evaluate.retrieval import retrieval_report
from train.evaluate.sets import resolve_eval_sets
from train.evaluate.verification import flip_mean, verification_accuracy

TINY = [
    "model.name=test_resnet",
    "model.in_chans=3",
    "data.image_size=32",
    "data.norm=imagenet",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.eval_batch_size=16",
    "zero.bf16=false",
    "max_steps=4",
    "checkpoint.every_steps=4",
    "checkpoint.every_minutes=0",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
    "model.needs_checkpoint=false",  # test_resnet from random weights, on purpose
]
CHEST_TINY = TINY + [
    "model.embed_dim=96",
    "loss.chest.hyp_dim=16",
    "loss.chest.proxies_per_class=2",
    "data.samples_per_class=0",
    "optim.head_lr=1e-2",
    "metrics.recall_ks=1,2,4",
]
RECIPES = {
    "cub": "vits_cub_chest_1gpu",
    "cars": "vits_cars_chest",
    "sop": "vits_sop_chest",
    "inshop": "vits_inshop_chest",
    "imagenet": "vitl_imagenet_8gpu",
    "ms1m": "vitl_ms1mv2_faces",
}
BUILDERS = {
    "cub": layouts.make_cub,
    "cars": layouts.make_cars,
    "sop": layouts.make_sop,
    "inshop": layouts.make_inshop,
    "imagenet": layouts.make_imagenet,
    "ms1m": layouts.make_ms1m,
}


def _train(recipe: str, overrides: list[str]) -> dict:
    from launch.__main__ import build_config
    from train.main import run

    return run(build_config(recipe, overrides)).to_json()


def _evaluate(
    run_dir: str, use_export: bool = False, splits: list[str] | None = None, overrides: list[str] | None = None
) -> dict:
    from train.evaluate.standalone import evaluate_run

    return evaluate_run(run_dir, None, use_export, splits, overrides)


def _cli(argv: list[str]) -> tuple[int, str]:
    """`python -m train.evaluate ARGV` inside a pool rank; (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = evaluate_cli(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, str]:
    """Every layout converted once: dataset -> data root (plus "faces": the .bin verification pairs)."""
    base = tmp_path_factory.mktemp("layouts")
    roots = {}
    for name, build in BUILDERS.items():
        build(str(base / f"{name}-src"))
        convert(
            [name, "--src", str(base / f"{name}-src"), "--out", str(base / name), "--shard-size", "4", "--no-progress"]
        )
        roots[name] = str(base / name)
    layouts.make_verification(str(base / "faces-src"), {"lfw": 20, "cfp_fp": 12})
    convert(
        [
            "verification",
            "--src",
            str(base / "faces-src"),
            "--out",
            str(base / "faces"),
            "--shard-size",
            "8",
            "--no-progress",
        ]
    )
    roots["faces"], roots["faces-src"] = str(base / "faces"), str(base / "faces-src")
    return roots


@pytest.fixture(scope="module")
def trained(dist_pool, converted, tmp_path_factory) -> dict[str, str]:
    """A few steps of each dataset's recipe on 2 ranks: dataset -> run dir."""
    run_root = str(tmp_path_factory.mktemp("runs"))
    faces = [
        f"metrics.eval_sets={converted['faces']}",
        "metrics.eval_every=2",
        "metrics.verification_folds=4",
        "model.embed_dim=32",
        "model.img_size=0",
        "model.patch_size=0",
    ]
    runs = {}
    for name, recipe in RECIPES.items():
        extra = CHEST_TINY if "chest" in recipe else TINY + (faces if name == "ms1m" else ["model.embed_dim=32"])
        if name == "inshop":
            extra = extra + ["metrics.recall_ks=1,2,4,8"]
        dist_pool(2).run(
            _train, recipe, [*extra, f"data.root={converted[name]}", f"run_root={run_root}", f"name={name}"]
        )
        runs[name] = os.path.join(run_root, name)
    return runs


def _eval_json(run_dir: str, name: str) -> dict:
    with open(os.path.join(run_dir, f"eval_{name}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["cub", "cars", "sop"])
def test_leave_one_out_retrieval_rows(dist_pool, trained, name: str) -> None:
    code, out = dist_pool(1).run(_cli, [trained[name]])[0]
    assert code == 0
    record = _eval_json(trained[name], "test")
    assert record["protocol"] == "retrieval" and record["ks"] == [1, 2, 4]
    metrics = record["metrics"]
    assert not any(k.startswith("acc_") for k in metrics)  # open set: test classes are not head classes
    assert metrics["num_samples"] == (20 if name == "sop" else 24)
    for space in ("euclidean", "cosine", "poincare", "fc_euclidean"):
        row = f"test (retrieval, {int(metrics['num_samples'])} images), {space}: R@1 / R@2 / R@4 / MAP@R = "
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert line.endswith(" / ".join(f"{100 * metrics[f'{space}/{c}']:.2f}" for c in ("R@1", "R@2", "R@4", "MAP@R")))
        assert 0.0 <= metrics[f"{space}/MAP@R"] <= metrics[f"{space}/R@1"] <= 1.0
    # two evaluation ranks give the same row as one
    two = dist_pool(2).run(_evaluate, trained[name])[0]
    for key, value in metrics.items():
        assert two["metrics"][key] == pytest.approx(value, abs=1e-9), key


def test_retrieval_equals_the_metric_on_the_same_embeddings(trained, converted) -> None:
    from train.embed import embed_shards, load_embedder
    from train.evaluate.standalone import load_run

    run = load_run(trained["sop"])
    embedder = load_embedder(trained["sop"], space="poincare")
    emb, labels, keys = embed_shards(embedder, run, converted["sop"], "test")
    assert emb.shape == (20, 16) and len(keys) == 20
    direct = retrieval_report(emb, labels, (1, 2, 4), "poincare", c=run.cfg.loss.chest.curvature)
    record = _eval_json(trained["sop"], "test")["metrics"]
    for key, value in direct.items():
        assert record[f"poincare/{key}"] == pytest.approx(value, abs=1e-9), key


def test_query_gallery_inshop(dist_pool, trained, converted) -> None:
    from train.embed import embed_shards, load_embedder
    from train.evaluate.standalone import load_run

    code, out = dist_pool(1).run(_cli, [trained["inshop"]])[0]
    assert code == 0
    record = _eval_json(trained["inshop"], "query")
    assert record["protocol"] == "query_gallery" and record["gallery_split"] == "gallery"
    metrics = record["metrics"]
    assert (metrics["num_samples"], metrics["num_gallery"]) == (12, 12)
    assert "query (query_gallery, 12 images vs 12 gallery), poincare: R@1 / R@2 / R@4 / R@8 / MAP@R = " in out
    run = load_run(trained["inshop"])
    embedder = load_embedder(trained["inshop"], space="poincare")
    q, ql, _ = embed_shards(embedder, run, converted["inshop"], "query")
    g, gl, _ = embed_shards(embedder, run, converted["inshop"], "gallery")
    direct = retrieval_report(q, ql, (1, 2, 4, 8), "poincare", c=0.5, ref_emb=g, ref_labels=gl)
    for key, value in direct.items():
        assert metrics[f"poincare/{key}"] == pytest.approx(value, abs=1e-9), key


def test_classification_imagenet(dist_pool, trained) -> None:
    code, out = dist_pool(1).run(_cli, [trained["imagenet"]])[0]
    assert code == 0
    metrics = _eval_json(trained["imagenet"], "val")["metrics"]
    assert metrics["num_samples"] == 12 and {"acc_measure", "acc_cosine"} <= set(metrics)
    assert (
        f"val (classification, 12 images): top-1 cosine {100 * metrics['acc_cosine']:.2f}, measure "
        f"{100 * metrics['acc_measure']:.2f}"
    ) in out


def test_faces_verification_in_the_loop_and_from_the_export(dist_pool, trained, converted) -> None:
    run_dir = trained["ms1m"]
    # during training: both .bin sets every 2 steps, their best values tracked
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("lfw", "cfp_fp"):
        assert {f"eval/{name}/euclidean/accuracy", f"eval/best/{name}/euclidean/accuracy"} <= tags
        steps = [e.step for e in acc.Scalars(f"eval/{name}/euclidean/accuracy")]
        assert steps == [2, 4]
        best = [e.value for e in acc.Scalars(f"eval/best/{name}/euclidean/accuracy")]
        values = [e.value for e in acc.Scalars(f"eval/{name}/euclidean/accuracy")]
        assert best[-1] == pytest.approx(max(values))
    # from the export, in 1 and 2 processes
    code, out = dist_pool(1).run(_cli, [run_dir, "--export", "metrics.verification_folds=4"])[0]
    assert code == 0
    two = dist_pool(2).run(_evaluate, run_dir, True, None, ["metrics.verification_folds=4"])[0]
    from train.embed import load_embedder

    embedder = load_embedder(run_dir, use_export=True)
    for name, pairs in (("lfw", 20), ("cfp_fp", 12)):
        record = _eval_json(run_dir, name)
        assert record["protocol"] == "verification" and record["metrics"]["num_pairs"] == pairs
        metrics = record["metrics"]
        assert (
            f"{name} (verification, {2 * pairs} images), {pairs} pairs, euclidean: accuracy "
            f"{100 * metrics['euclidean/accuracy']:.2f}" in out
        )
        for key, value in metrics.items():
            assert two["metrics"][f"{name}/{key}"] == pytest.approx(value, abs=1e-9), key
        # the protocol called directly on the same images, embedded with their flips
        images, issame = read_bin(os.path.join(converted["faces-src"], f"{name}.bin"))
        x = torch.stack([embedder.transform(decode_image(b, 3)) for b in images])
        emb = flip_mean(embedder(x), embedder(torch.flip(x, dims=[-1])))
        direct = verification_accuracy(emb[0::2], emb[1::2], torch.tensor(issame), num_folds=4)
        for key, value in direct.items():
            assert metrics[f"euclidean/{key}"] == pytest.approx(value, abs=1e-6), key


def test_embed_cli_writes_embeddings(trained, converted, tmp_path) -> None:
    from train.embed import main as embed

    out = str(tmp_path / "emb.pt")
    assert (
        embed(
            [
                trained["cub"],
                "--shards",
                converted["cub"],
                "--split",
                "test",
                "--out",
                out,
                "--space",
                "poincare",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    saved = torch.load(out, weights_only=False)
    assert saved["embeddings"].shape == (24, 16) and saved["labels"].shape == (24,) and len(saved["keys"]) == 24
    assert float(saved["embeddings"].norm(dim=1).max()) < 2**0.5  # inside the ball of radius 1/sqrt(c)
    # without --split: the run's own evaluation split (ImageNet's "val"; it has no "test")
    assert embed([trained["imagenet"], "--shards", converted["imagenet"], "--out", out, "--device", "cpu"]) == 0
    assert (
        torch.load(out, weights_only=False)["embeddings"].shape[0]
        == _eval_json(trained["imagenet"], "val")["metrics"]["num_samples"]
    )
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(layouts.class_jpeg(i, i))
    assert embed([trained["cub"], "--images", str(folder), "--out", out, "--device", "cpu"]) == 0
    saved = torch.load(out, weights_only=False)
    assert saved["embeddings"].shape == (3, 96) and saved["keys"][0].endswith("0.jpg")
    assert embed([trained["cub"], "--images", str(folder), "--out", out, "--space", "cosine", "--device", "cpu"]) == 0
    unit = torch.load(out, weights_only=False)["embeddings"]  # cosine: the same directions, as unit vectors
    assert torch.allclose(unit.norm(dim=1), torch.ones(3)) and torch.allclose(
        unit, torch.nn.functional.normalize(saved["embeddings"], dim=1), atol=1e-6
    )


def test_bad_input_is_refused_before_anything_is_embedded(trained, converted, tmp_path, capsys, monkeypatch) -> None:
    import train.evaluate.protocols as protocols

    def never(*args, **kwargs):
        raise AssertionError("embedded despite bad input")

    monkeypatch.setattr(protocols, "embed_loader", never)
    sop = trained["sop"]
    odd = str(tmp_path / "faces-odd")
    shutil.copytree(converted["faces"], odd)
    with open(os.path.join(odd, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["splits"]["lfw"]["num_samples"] = 39
    with open(os.path.join(odd, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    cases = [
        ([sop, "--split", "nothere"], "has no split 'nothere' (it has test, train)"),
        ([sop, "model.name=resnet10t"], "holds another model (model.name: 'test_resnet' in the checkpoint"),
        ([sop, "data.num_classes=7"], "holds a table of 4 classes"),
        # the class permutation / radii / curvature would read the saved rows as other classes or spaces
        ([sop, "loss.init_seed=7"], "holds another model (loss.init_seed: 1234 in the checkpoint, 7 now)"),
        ([sop, "loss.chest.curvature=1.0"], "overrides change the run's head (loss.chest.curvature: 0.5 -> 1.0)"),
        ([sop, f"metrics.eval_sets={odd}"], "holds 39 images for 20 pairs"),
        ([trained["inshop"], "metrics.gallery_split=nothere"], "query split 'query' needs a gallery"),
        ([sop, "metrics.recall_ks=1,50"], "Recall@50 needs 50 references but the split offers 19"),
        ([sop, "--checkpoint", "step-99"], "step-99 is not a complete checkpoint"),
    ]
    for argv, message in cases:
        assert evaluate_cli(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not os.path.exists(os.path.join(sop, "eval_lfw.json"))


def test_protocols_and_ks_come_from_the_manifest(converted) -> None:
    import dataclasses

    from launch.recipes import get_recipe

    def sets(recipe: str, root: str, **metrics):
        cfg = get_recipe(recipe)
        return resolve_eval_sets(dataclasses.replace(cfg.data, root=root), dataclasses.replace(cfg.metrics, **metrics))

    assert [(s.protocol, s.ks, s.prefix) for s in sets("vits_cub_chest_1gpu", converted["cub"])] == [
        ("retrieval", (1, 2, 4, 8), "")
    ]
    assert [s.protocol for s in sets("vitl_imagenet_8gpu", converted["imagenet"])] == ["classification"]
    with pytest.raises(ValueError, match=r"Recall@1000 needs 1000 references .* set metrics.recall_ks=1,10"):
        sets("vits_sop_chest", converted["sop"])  # SOP's own K = 1, 10, 100, 1000 on the tiny copy
    with pytest.raises(ValueError, match=r"Recall@50 needs 50 references but the split offers 12"):
        sets("vits_inshop_chest", converted["inshop"])  # In-shop's 1..50 against its 12-image gallery
    faces = sets("vitl_ms1mv2_faces", converted["ms1m"], eval_sets=(converted["faces"],))
    assert [(s.name, s.protocol, s.prefix) for s in faces] == [
        ("cfp_fp", "verification", "cfp_fp/"),
        ("lfw", "verification", "lfw/"),
    ]
    only = sets("vitl_ms1mv2_faces", converted["ms1m"], eval_sets=(f"{converted['faces']}:lfw",))
    assert [s.name for s in only] == ["lfw"]
    with pytest.raises(ValueError, match=r"share a name \(\['test', 'test'\]\)"):
        sets("vits_cub_chest_1gpu", converted["cub"], eval_sets=(f"{converted['cars']}:test",))  # both eval_test.json
    with pytest.raises(FileNotFoundError, match="metrics.eval_sets names .*nowhere"):
        sets("vitl_ms1mv2_faces", converted["ms1m"], eval_sets=("/nowhere",))
    with pytest.raises(ValueError, match="protocol='nope' is unknown"):
        dataclasses.replace(get_recipe("mnist_distarc").metrics, protocol="nope").validate()


def test_launcher_evaluates_on_two_local_processes(trained, capsys) -> None:
    """`python -m launch.evaluate RUN --procs 2`: two submitit tasks, the same numbers as one rank."""
    from launch.evaluate import main as launch_evaluate

    one = _eval_json(trained["cars"], "test")["metrics"]
    assert launch_evaluate([trained["cars"], "--procs", "2"]) == 0
    out = capsys.readouterr().out
    assert "(2 ranks)" in out and "test (retrieval, 24 images), poincare: R@1 / R@2 / R@4 / MAP@R = " in out
    two = _eval_json(trained["cars"], "test")["metrics"]
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=1e-9), key


def test_a_bad_image_drops_its_pair_and_is_counted(dist_pool, trained, tmp_path) -> None:
    import pickle

    images, issame = layouts.face_pairs(12, 50)
    images[5] = b"\xff\xd8\xff\xe0" + b"\x00" * 40  # a JPEG header over nothing: passes the cheap check, fails decode
    src = tmp_path / "bad-src"
    src.mkdir()
    (src / "agedb_30.bin").write_bytes(pickle.dumps((images, issame)))
    convert(["verification", "--src", str(src), "--out", str(tmp_path / "bad"), "--no-progress"])
    result = dist_pool(1).run(
        _evaluate,
        trained["ms1m"],
        True,
        None,
        [f"metrics.eval_sets={tmp_path / 'bad'}", "metrics.verification_folds=4"],
    )[0]
    metrics = {k: v for k, v in result["metrics"].items() if k.startswith("agedb_30/")}
    assert metrics["agedb_30/skipped_samples"] == 1 and metrics["agedb_30/num_samples"] == 23
    assert metrics["agedb_30/num_pairs"] == 11  # pair 2 lost its second image and is left out


def test_the_end_of_training_evaluation_equals_the_checkpoint_s(dist_pool, mnist_root, tmp_path) -> None:
    """A BatchNorm trunk on 2 ranks: DeepSpeed syncs parameters, never buffers, so each rank's running
    statistics drift on its own data. The evaluation at the end of training (each rank embedding its half
    with its own statistics) must equal re-evaluating the saved checkpoint (which stores one set)."""
    from tests.test_train import small_overrides

    args = small_overrides(mnist_root, str(tmp_path), "bn", 20) + ["metrics.retrieval=true"]
    dist_pool(2).run(_train, "mnist_chest", args)
    with open(tmp_path / "bn" / "summary.json") as f:
        in_training = json.load(f)
    again = dist_pool(1).run(_evaluate, str(tmp_path / "bn"))[0]["metrics"]
    assert {"poincare/MAP@R", "acc_poincare"} <= set(again)
    # Not bit-exact: the two evaluations batch other images together, and the conv's float rounding then
    # moves MAP@R by ~1e-6 (a near-tie); one query of 1000 changing its neighbour would be 1e-3. Unsynced
    # statistics moved euclidean R@1 from 0.570 to 0.583 in this very run.
    for key, value in again.items():
        assert in_training[key] == pytest.approx(value, abs=2e-3), key
    assert in_training["acc_poincare"] == again["acc_poincare"]
    # the export (its table in class order, CHEST's rows put back) evaluates as the checkpoint it came from
    assert dist_pool(1).run(_evaluate, str(tmp_path / "bn"), True)[0]["metrics"] == again


def _embed_under_zero3(batches_per_rank: list[int], flip: bool) -> tuple[list[float], list[int]]:
    """embed_loader through a ZeRO-3 engine on this rank's share of 4-image batches (seeded by rank)."""
    import torch.distributed as dist

    from train.config import OptimConfig, ZeroConfig
    from train.engine import build_engine
    from train.evaluate.protocols import embed_loader

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    reference = copy.deepcopy(net)
    # threshold 0: no parameter stays whole on every rank, so every forward gathers (a ViT's blocks do)
    engine = build_engine(
        net,
        OptimConfig(warmup_steps=0),
        ZeroConfig(stage=3, bf16=False, stage3_param_persistence_threshold=0),
        micro_batch=4,
        max_steps=10,
    )
    engine.eval()

    class Task:
        backbone = engine

        class head:
            embed_dim = 8

        @staticmethod
        def embed(x: torch.Tensor) -> torch.Tensor:
            return engine(x).float()

    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    loader = [
        (torch.randn(4, 16, generator=generator), torch.arange(4) + 10 * rank) for _ in range(batches_per_rank[rank])
    ]
    emb, labels, _ = embed_loader(Task(), loader, torch.device("cpu"), lambda x: x, flip=flip)  # type: ignore[arg-type]
    with torch.no_grad():
        images = torch.cat([x for x, _ in loader]) if loader else torch.zeros(0, 16)
        mine = reference(images)
        if flip:
            mine = flip_mean(mine, reference(torch.flip(images, dims=[-1])))
        start = sum(4 * n for n in batches_per_rank[:rank])
    assert torch.allclose(emb[start : start + mine.shape[0]], mine, atol=1e-5)
    return emb.sum(dim=1).tolist(), labels.tolist()


@pytest.mark.parametrize("batches_per_rank, flip", [([3, 1], False), ([2, 0], True), ([0, 1], False)])
def test_zero3_evaluation_with_uneven_batches_finishes(dist_pool, batches_per_rank, flip) -> None:
    """Under ZeRO-3 every forward gathers parameters from all ranks: a rank with fewer eval batches (eval shards
    are dealt whole, a rank may get none) left the others waiting in a gather for ever (the job hung)."""
    results = dist_pool(2).run(_embed_under_zero3, batches_per_rank, flip, timeout_s=90)
    labels = [
        label for rank, n in enumerate(batches_per_rank) for _ in range(n) for label in range(10 * rank, 10 * rank + 4)
    ]
    assert results[0] == results[1] and results[0][1] == labels


def _evaluate_with_nonfinite_rows(run_dir: str) -> dict:
    """_evaluate with the model embedding the first image of every batch as NaN (a diverging model)."""
    from model.task import MetricLearningTask

    real = MetricLearningTask.embed

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = real(self, x).clone()
        out[:1] = float("nan")
        return out

    MetricLearningTask.embed = embed  # type: ignore[method-assign]
    try:
        return _evaluate(run_dir)
    finally:
        MetricLearningTask.embed = real  # type: ignore[method-assign]


def test_nonfinite_embeddings_are_left_out_and_counted(dist_pool, trained) -> None:
    metrics = dist_pool(1).run(_evaluate_with_nonfinite_rows, trained["sop"])[0]["metrics"]
    bad = metrics["nonfinite_embeddings"]
    assert bad >= 1 and metrics["num_samples"] + bad == 20 and metrics["skipped_samples"] == 0
    assert all(0.0 <= metrics[f"poincare/{key}"] <= 1.0 for key in ("R@1", "MAP@R"))

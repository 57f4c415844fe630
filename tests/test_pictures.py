"""Pictures of the embedding spaces and the hparams summary, read back from the event file.

Tiny CPU heads (a few classes); every number drawn or histogrammed is checked against numpy or a
dense head built independently (rows are keyed by global class id, so a world-size-1 head holds
the same rows as rank 0's shard).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from data.config import DataConfig
from model.config import ChestConfig, LossConfig
from model.task import build_head
from model.hyperbolic import to_ball
from train import pictures
from train.config import RunConfig
from train.tensorboard_logger import TensorBoardLogger, main_hparams


def read_events(tb_dir: str) -> EventAccumulator:
    acc = EventAccumulator(tb_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def decoded_image(acc: EventAccumulator, tag: str) -> np.ndarray:
    """The last image of `tag`, decoded; asserts a plausible, non-blank picture."""
    event = acc.Images(tag)[-1]
    img = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert img.shape == (event.height, event.width, 3) and min(img.shape[:2]) >= 300
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # axes, labels and coloured points, not a blank canvas
    return img


def clustered(num_classes: int, per_class: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.randn(num_classes, dim, generator=gen) * 10
    return centres[labels] + torch.randn(labels.shape[0], dim, generator=gen), labels


def test_disk_projection_keeps_norms_inside_the_disk_and_planar_geometry() -> None:
    gen = torch.Generator().manual_seed(0)
    c = 0.5
    ball = to_ball(torch.randn(400, 16, generator=gen) * 3, c, 2.3)
    proxies = to_ball(torch.randn(10, 16, generator=gen) * 3, c, 2.3)
    unit, prox_unit = ball * math.sqrt(c), proxies * math.sqrt(c)  # the ball of radius 1/sqrt(c) -> unit disk
    p2, e2 = pictures.disk_projection(unit, prox_unit)
    assert e2 is not None and p2.shape == (400, 2) and e2.shape == (10, 2)
    np.testing.assert_allclose(p2.norm(dim=1).numpy(), np.linalg.norm(unit.double().numpy(), axis=1), rtol=1e-12)
    np.testing.assert_allclose(e2.norm(dim=1).numpy(), np.linalg.norm(prox_unit.double().numpy(), axis=1), rtol=1e-12)
    assert float(p2.norm(dim=1).max()) < 1.0 and float(e2.norm(dim=1).max()) < 1.0
    # points that already lie in a plane through the centre come out isometric (a rotation of that plane)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=gen, dtype=torch.float64))[0]
    flat = (torch.rand(200, 2, generator=gen, dtype=torch.float64) - 0.5) @ basis.t()
    q2, _ = pictures.disk_projection(flat)
    q, f = q2.numpy(), flat.numpy()
    np.testing.assert_allclose(
        np.linalg.norm(q[:, None] - q[None], axis=2), np.linalg.norm(f[:, None] - f[None], axis=2), atol=1e-10
    )


def test_disk_projection_keeps_a_narrow_cone_narrow() -> None:
    """Points in a cone away from the centre (trunk features share a large mean): the axes are taken about the
    ball's centre, so the drawn angles stay those of the cone (axes about the mean spread it over 360 degrees)."""
    gen = torch.Generator().manual_seed(0)
    axis = torch.zeros(64, dtype=torch.float64)
    axis[0] = 1.0
    points = torch.nn.functional.normalize(axis + 0.03 * torch.randn(300, 64, generator=gen, dtype=torch.float64))
    points = points * 0.8

    def widest(v: torch.Tensor) -> float:
        unit = torch.nn.functional.normalize(v, dim=1)
        return math.degrees(math.acos(float((unit @ unit.t()).min().clamp(-1, 1))))

    drawn, _ = pictures.disk_projection(points)
    assert widest(drawn) <= widest(points) + 1.0 < 60.0


def test_radius_lines_are_those_of_the_classes_drawn(monkeypatch) -> None:
    """One class per sphere (S = C = 100): the lines cover the radii of the classes drawn, thinned to 50."""
    cfg = LossConfig(name="distarc", radius_start=2.0, radius_gap=0.5, num_spheres=100)
    head = build_head(cfg, 100, 8)
    labels = torch.arange(100).repeat_interleave(3)
    emb = torch.nn.functional.normalize(torch.randn(300, 8)) * (2.0 + 0.5 * labels[:, None])
    drawn: dict = {}
    monkeypatch.setattr(pictures, "radial_angular_figure", lambda *a, **k: drawn.update(radii=a[3], title=k["title"]))
    pictures.head_pictures(head.embed_spaces(emb), labels, head, closed_set=True)
    assert len(drawn["radii"]) == 50 and "50 of its 100 sphere radii" in drawn["title"]
    assert drawn["radii"][0] == 2.0 and drawn["radii"][-1] >= 2.0 + 0.5 * 98  # up to the last class, not r_49
    few = LossConfig(name="distarc", radius_start=10.0, radius_gap=5.0, num_spheres=3)
    pictures.head_pictures(build_head(few, 6, 8).embed_spaces(emb[:12]), labels[:12] % 2, build_head(few, 6, 8), True)
    assert drawn["radii"] == [10.0, 15.0] and "the classes' sphere radii" in drawn["title"]  # classes 0, 1 only


def test_distarc_radial_angular_picture_and_radius_error_histogram(tmp_path) -> None:
    cfg = LossConfig(name="distarc", radius_start=10.0, radius_gap=5.0, num_spheres=3)
    head = build_head(cfg, 6, 8, rank=0, world_size=2)  # rank 0's shard: classes 0..2 of 6
    emb, labels = clustered(6, 40, 8)
    logger = TensorBoardLogger(str(tmp_path), True)
    logger.log_embeddings(3, head.embed_spaces(emb), labels, head.weight, head=head)
    logger.close()
    acc = read_events(logger.tb_dir)
    assert acc.Tags()["images"] == ["eval/radial_angular"]  # no ball, no disk
    decoded_image(acc, "eval/radial_angular")
    x, y = emb.double().numpy(), labels.numpy()
    err = np.linalg.norm(x, axis=1) - (10.0 + 5.0 * (y % 3))  # every sample: r_y needs no table row
    hist = acc.Histograms("eval/radius_error")[-1]
    assert hist.step == 3 and hist.histogram_value.num == 240
    assert hist.histogram_value.min == pytest.approx(err.min(), rel=1e-5)
    assert hist.histogram_value.max == pytest.approx(err.max(), rel=1e-5)
    assert hist.histogram_value.sum == pytest.approx(err.sum(), rel=1e-5, abs=1e-3)
    assert hist.histogram_value.sum_squares == pytest.approx((err**2).sum(), rel=1e-5)
    # what is drawn: the shard's samples only, angles to the rows of a dense head's same classes
    keep, angles, norms = pictures.angles_to_anchors(emb, labels, head)
    dense = build_head(cfg, 6, 8).weight.detach().double().numpy()
    mask = y < 3
    w = dense[y[mask]]
    cos = (x[mask] * w).sum(1) / np.linalg.norm(x[mask], axis=1) / np.linalg.norm(w, axis=1)
    np.testing.assert_array_equal(keep.numpy(), np.nonzero(mask)[0])
    np.testing.assert_allclose(angles.numpy(), np.degrees(np.arccos(cos)), atol=1e-3)
    np.testing.assert_allclose(norms.numpy(), np.linalg.norm(x[mask], axis=1), rtol=1e-6)
    # open-set labels are not the head's classes: no anchor pictures
    logger = TensorBoardLogger(str(tmp_path / "open"), True)
    logger.log_embeddings(3, head.embed_spaces(emb), labels, head=head, protocol="retrieval")
    logger.close()
    acc = read_events(logger.tb_dir)
    assert acc.Tags()["images"] == [] and "eval/radius_error" not in acc.Tags()["histograms"]


def test_pair_similarity_histograms_use_same_and_different_labels(tmp_path) -> None:
    # class c points along e_c at different lengths: positives have cosine 1, negatives 0
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10 + [3])  # class 3: one sample, no positive pair
    emb = torch.eye(8)[labels] * (1 + torch.arange(labels.shape[0], dtype=torch.float32))[:, None]
    logger = TensorBoardLogger(str(tmp_path), True)
    logger.log_embeddings(1, {"euclidean": emb, "cosine": emb}, labels)
    logger.close()
    acc = read_events(logger.tb_dir)
    pos = acc.Histograms("eval/sim_positive")[-1].histogram_value
    neg = acc.Histograms("eval/sim_negative")[-1].histogram_value
    assert pos.num == 2000 and pos.min == pytest.approx(1.0) and pos.max == pytest.approx(1.0)
    assert neg.num == 2000 and neg.min == 0.0 and neg.max == 0.0
    # random vectors: every sampled similarity is one of its kind's brute-force values; seeded
    emb, labels = clustered(5, 12, 6, seed=1)
    pos_s, neg_s = pictures.pair_similarities(emb, labels, num_pairs=500, seed=7)
    unit = emb.double().numpy() / np.linalg.norm(emb.double().numpy(), axis=1, keepdims=True)
    sims, y = unit @ unit.T, labels.numpy()
    same, off_diag = y[:, None] == y[None, :], ~np.eye(len(y), dtype=bool)
    for got, allowed in ((pos_s, sims[same & off_diag]), (neg_s, sims[~same])):
        assert got.shape == (500,)
        assert np.abs(got.double().numpy()[:, None] - allowed[None, :]).min(axis=1).max() < 1e-5
    again = pictures.pair_similarities(emb, labels, num_pairs=500, seed=7)
    assert torch.equal(again[0], pos_s) and torch.equal(again[1], neg_s)
    # verification labels are pair ids, not identities: no similarity histograms
    logger = TensorBoardLogger(str(tmp_path / "ver"), True)
    logger.log_embeddings(1, {"euclidean": emb}, labels, protocol="verification")
    logger.close()
    assert not {"eval/sim_positive", "eval/sim_negative"} & set(read_events(logger.tb_dir).Tags()["histograms"])


def test_chest_poincare_disk_draws_ball_points_and_rank0_proxies(tmp_path) -> None:
    ch = ChestConfig(hyp_dim=4, proxies_per_class=2, curvature=0.5, clip_radius=2.3)
    cfg = LossConfig(name="chest", chest=ch)
    head = build_head(cfg, 6, 8, rank=0, world_size=2)  # 3 of 6 (permuted) classes on rank 0
    emb, labels = clustered(6, 30, 8, seed=2)
    spaces = head.embed_spaces(emb)
    logger = TensorBoardLogger(str(tmp_path), True)
    logger.log_embeddings(5, spaces, labels, head.proxies, head=head)
    logger.close()
    acc = read_events(logger.tb_dir)
    assert acc.Tags()["images"] == ["eval/poincare_disk"] and "eval/radius_error" not in acc.Tags()["histograms"]
    decoded_image(acc, "eval/poincare_disk")
    fig = pictures.head_pictures(spaces, labels, head, closed_set=True)["eval/poincare_disk"]
    points, stars = (np.asarray(col.get_offsets()) for col in fig.axes[0].collections)
    sqrt_c = math.sqrt(0.5)
    # points: sqrt(c) * their ball norm, inside the unit disk
    ball_norm = np.linalg.norm(spaces["poincare"].double().numpy(), axis=1)
    np.testing.assert_allclose(np.sort(np.linalg.norm(points, axis=1)), np.sort(sqrt_c * ball_norm), rtol=1e-6)
    assert np.linalg.norm(points, axis=1).max() < 1.0
    # stars: rank 0's 3 classes x K = 2 proxies, at tanh(sqrt(c) ||clip(h(p))||) (expmap0's norm, by hand)
    assert head.fc is not None
    w, b = head.fc.weight.detach().double().numpy(), head.fc.bias.detach().double().numpy()
    h = head.proxies.detach().double().numpy().reshape(-1, 8) @ w.T + b
    h_norm = np.linalg.norm(h, axis=1)
    clipped = h_norm * np.minimum(1.0, 2.3 / (h_norm + 1e-5))
    np.testing.assert_allclose(np.sort(np.linalg.norm(stars, axis=1)), np.sort(np.tanh(sqrt_c * clipped)), rtol=1e-5)
    assert "rank 0's classes only (3 of 6)" in fig.axes[0].get_title()
    # proxies go through h only for the classes of the points drawn (not the whole shard)
    few = torch.isin(labels, head.class_unperm[:2])  # rank 0's first two classes
    calls: list[int] = []
    hook = head.fc.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    fig = pictures.head_pictures(head.embed_spaces(emb[few]), labels[few], head, closed_set=True)["eval/poincare_disk"]
    hook.remove()
    assert calls == [60, 2 * 2]  # the points' own mapping, then 2 classes x K proxies
    assert len(np.asarray(fig.axes[0].collections[1].get_offsets())) == 4
    # open set: the points without proxies
    fig = pictures.head_pictures(spaces, labels, head, closed_set=False)["eval/poincare_disk"]
    assert len(fig.axes[0].collections) == 1 and "open-set" in fig.axes[0].get_title()


def test_hparams_are_in_the_run_s_own_event_file(tmp_path) -> None:
    cfg = RunConfig(
        name="r",
        max_steps=7,
        data=DataConfig(root="/nowhere", batch_size=32),
        loss=LossConfig(name="distarc", margin=0.3),
    )
    hparams = {**main_hparams(cfg.to_dict()), "global_batch": 64}
    assert not any(k.startswith("loss.chest.") for k in hparams)  # DistArc: CHEST's fields are noise
    chest = main_hparams(
        RunConfig(name="c", max_steps=1, data=DataConfig(root="/x"), loss=LossConfig(name="chest")).to_dict()
    )
    assert chest["loss.chest.curvature"] == 0.5
    logger = TensorBoardLogger(str(tmp_path), True)
    logger.log_hparams(
        hparams, {"acc_measure": 0.75, "cosine/R@1": 0.5, "last_train_loss": None, "diverged": float("nan")}, step=7
    )
    logger.close()
    # no subfolder but the by_samples axis' run, which holds no hparams (a subfolder with them is another session)
    assert [f for f in os.listdir(logger.tb_dir) if not os.path.isfile(os.path.join(logger.tb_dir, f))] == [
        "by_samples"
    ]
    assert not read_events(os.path.join(logger.tb_dir, "by_samples")).Tags()["tensors"]  # hparams are tensors
    acc = read_events(logger.tb_dir)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["data.batch_size"].number_value == 32 and start.hparams["global_batch"].number_value == 64
    assert start.hparams["loss.name"].string_value == "distarc"
    assert start.hparams["loss.margin"].number_value == pytest.approx(0.3)
    assert start.hparams["zero.bf16"].string_value == "False"
    assert "_hparams_/experiment" not in content  # test_separate_runs_show_the_union_of_their_hparams
    assert [(e.step, e.value) for e in acc.Scalars("hparams/acc_measure")] == [(7, 0.75)]
    assert "eval/acc_measure" not in acc.Tags()["scalars"]


def hparams_experiment(logdir: str):
    """What TensorBoard's HPARAMS tab shows for `logdir` (its own backend, in process)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, logdir)
    backend = backend_context.Context(base_plugin.TBContext(logdir=logdir, multiplexer=mux, data_provider=provider))
    ctx = context.RequestContext()
    metadata = backend.hparams_metadata(ctx, "")
    return backend.experiment_from_metadata(ctx, "", True, metadata, backend.hparams_from_data_provider(ctx, "", 0))


def test_separate_runs_show_the_union_of_their_hparams(tmp_path) -> None:
    """TensorBoard shows the first HPARAMS experiment it finds under its logdir: each run writing its own, a
    DistArc run's hid a CHEST run's loss.chest.* settings and Poincare scores in a common runs/ folder."""
    for name, hparams, metrics in (
        ("a_distarc", {"loss.name": "distarc", "loss.margin": 0.5}, {"acc_measure": 0.7}),
        ("b_chest", {"loss.name": "chest", "loss.chest.curvature": 0.5}, {"acc_poincare": 0.8}),
    ):
        logger = TensorBoardLogger(str(tmp_path / name), True)
        logger.log_hparams(hparams, metrics, step=5)
        logger.close()
    experiment = hparams_experiment(str(tmp_path))
    assert sorted(h.name for h in experiment.hparam_infos) == ["loss.chest.curvature", "loss.margin", "loss.name"]
    assert {"hparams/acc_measure", "hparams/acc_poincare"} <= {m.name.tag for m in experiment.metric_infos}


def test_a_resumed_run_purges_what_the_dead_job_logged_after_its_checkpoint(tmp_path) -> None:
    """The dead job logged steps 1..8 (checkpoint at 5); the resumed one logs 6..10. Each step shows once,
    on both x axes (steps, and samples seen in tb/by_samples: one purge step for both would have dropped the
    whole by_samples history, whose steps are sample counts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dead = TensorBoardLogger(str(tmp_path), True)
    for step in range(1, 9):
        dead.log(step, 64 * step, {"loss": float(step)})
    dead.close()
    resumed = TensorBoardLogger(str(tmp_path), True, resume_step=5, resume_samples=320)
    for step in range(6, 11):
        resumed.log(step, 64 * step, {"loss": 100.0 + step})
    resumed.close()
    for folder, tag, xs in (("tb", "train/loss", range(1, 11)), ("tb/by_samples", "by_samples/train/loss", None)):
        acc = EventAccumulator(str(tmp_path / folder))
        acc.Reload()
        events = acc.Scalars(tag)
        want = [64 * s for s in range(1, 11)] if xs is None else list(xs)
        assert [e.step for e in events] == want, folder
        assert [e.value for e in events] == [float(s) for s in range(1, 6)] + [100.0 + s for s in range(6, 11)]


def test_non_finite_embeddings_and_a_failing_picture_do_not_end_the_run(tmp_path, monkeypatch, capsys) -> None:
    cfg = LossConfig(name="distarc", radius_start=10.0, radius_gap=5.0, num_spheres=3)
    head = build_head(cfg, 6, 8)
    emb, labels = clustered(6, 40, 8)
    emb[:200] = float("nan")  # a diverged model: most embeddings NaN (all-NaN histograms raised before)
    logger = TensorBoardLogger(str(tmp_path), True)
    logger.log_embeddings(3, head.embed_spaces(emb), labels, head.weight, head=head)
    hist = read_events(logger.tb_dir).Histograms("eval/radius_error")[-1]
    assert hist.histogram_value.num == 40  # the finite ones only
    emb[:] = float("nan")
    logger.log_embeddings(4, head.embed_spaces(emb), labels, head.weight, head=head)
    monkeypatch.setattr(pictures, "head_pictures", lambda *args: 1 / 0)
    logger.log_embeddings(5, head.embed_spaces(clustered(6, 40, 8)[0]), labels, head.weight, head=head)
    logger.close()
    assert "pictures of step 5 skipped: ZeroDivisionError" in capsys.readouterr().err
    acc = read_events(logger.tb_dir)
    assert [h.step for h in acc.Histograms("eval/radius_error")] == [3, 5]  # step 4: nothing finite to draw


def test_a_job_that_logs_at_its_checkpoint_step_again_replaces_that_step(tmp_path) -> None:
    """A finished run started again (or an evaluation left pending) evaluates at the checkpoint's step again:
    that step is purged too and the checkpoint's record of its train scalars written back, so every tag shows
    it once; the projector keeps the earlier jobs' embeddings (SummaryWriter started a new list each job)."""
    emb, labels = clustered(3, 4, 5)
    first = TensorBoardLogger(str(tmp_path), True)
    for step in (5, 10):
        first.log(step, 64 * step, {"loss": float(step)})
        first.log_embeddings(step, {"euclidean": emb}, labels)
    first.log(10, 640, {"acc": 0.5}, prefix="eval")
    first.close()
    again = TensorBoardLogger(str(tmp_path), True, 10, 640, rewrite={"train": {"loss": 10.0}})
    again.log_embeddings(10, {"euclidean": emb}, labels)
    again.log(10, 640, {"acc": 0.5}, prefix="eval")
    again.close()
    acc = read_events(str(tmp_path / "tb"))
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(5, 5.0), (10, 10.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/acc")] == [(10, 0.5)]
    samples = read_events(str(tmp_path / "tb" / "by_samples"))
    assert [e.step for e in samples.Scalars("by_samples/train/loss")] == [320, 640]
    with open(tmp_path / "tb" / "projector_config.pbtxt") as f:
        assert [line.split('"')[1] for line in f if "tensor_name" in line] == ["euclidean:00005", "euclidean:00010"]
    # a plain resume at step 7 keeps what came before it and drops the dead job's step 10
    later = TensorBoardLogger(str(tmp_path), True, 7, 448)
    later.log_embeddings(9, {"euclidean": emb}, labels)
    later.close()
    with open(tmp_path / "tb" / "projector_config.pbtxt") as f:
        assert [line.split('"')[1] for line in f if "tensor_name" in line] == ["euclidean:00005", "euclidean:00009"]


def test_non_finite_rows_do_not_take_the_disk_picture_down() -> None:
    gen = torch.Generator().manual_seed(1)
    points = to_ball(torch.randn(50, 6, generator=gen), 0.5, 2.3)
    broken = points.clone()
    broken[::5] = float("nan")  # a few diverged embeddings (the SVD of all rows raised)
    p2, _ = pictures.disk_projection(broken)
    finite = torch.isfinite(broken).all(dim=1)
    assert bool(torch.isfinite(p2[finite]).all()) and not bool(torch.isfinite(p2[~finite]).any())
    q2, _ = pictures.disk_projection(points[finite])
    torch.testing.assert_close(p2[finite], q2)


def test_class_colours_and_the_projector_sample_do_not_depend_on_the_gather_order(tmp_path) -> None:
    """Colours came from the drawn sample's most frequent classes, and the sample from the rows' positions: the
    same set gathered in another rank order (a resume on another world size) re-coloured every class. The
    projector took the first rows (rank 0's first shards): a split stored class by class showed a few classes."""
    ball, labels = clustered(30, 170, 2, seed=3)
    ball = to_ball(ball / 40, 1.0, 2.3)
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(1))  # another gather order

    def colour_of_class(points: torch.Tensor, labs: torch.Tensor) -> dict[int, tuple]:
        fig = pictures.poincare_disk_figure(points, labs, curvature=1.0)
        drawn = labs[pictures.sample_rows(labs.shape[0], 1000)].tolist()
        faces = fig.axes[0].collections[0].get_facecolors()
        return {y: tuple(np.round(c, 6)) for y, c in zip(drawn, faces) if tuple(c) != pictures.GREY}

    first, second = colour_of_class(ball, labels), colour_of_class(ball[order], labels[order])
    common = set(first) & set(second)
    assert len(common) >= 15 and all(first[y] == second[y] for y in common)
    logger = TensorBoardLogger(str(tmp_path), True)
    logger.log_embeddings(1, {"euclidean": ball}, labels, None, max_points=300)
    logger.close()
    with open(os.path.join(logger.tb_dir, "00001", "euclidean", "metadata.tsv")) as f:
        shown = {int(line) for line in f.read().split()}
    assert len(shown) == 30  # every class of the set (the first 300 rows held 2)


def test_the_pictures_name_their_coloured_classes() -> None:
    """A legend gives the label of each strong colour (the ten most frequent classes) and says what grey is;
    the disk keeps its proxies' legend beside it."""
    from matplotlib.legend import Legend

    points, labels = clustered(30, 20, 2, seed=5)
    labels = torch.where(labels < 3, labels, labels + 100)  # ids that are not positions
    labels = torch.cat([labels, torch.full((40,), 117)])  # class 117 the most frequent
    points = torch.cat([points, torch.randn(40, 2, generator=torch.Generator().manual_seed(0))])
    ball = to_ball(points / 40, 1.0, 2.3)
    colours, top = pictures._class_colours(labels.numpy())
    assert top[0] == 117
    angles = torch.rand(labels.shape[0]) * 180
    named = [*(str(y) for y in top[:10]), "+10 coloured", "other classes"]
    for fig, others in (
        (pictures.poincare_disk_figure(ball, labels, 1.0, proxies=ball[:4], proxy_labels=labels[:4]), [["proxies"]]),
        (pictures.radial_angular_figure(angles, ball.norm(dim=1), labels, [1.0, 2.0]), []),
    ):
        ax = fig.axes[0]
        legends = [ax.get_legend(), *(a for a in ax.artists if isinstance(a, Legend))]
        assert [[t.get_text() for t in legend.get_texts()] for legend in legends] == [named, *others]
        handles = legends[0].legend_handles
        assert all(tuple(h.get_color()) == colours[y] for h, y in zip(handles, top[:10]))
        pictures.figure_to_rgb(fig)  # renders


def test_embeddings_of_a_step_evaluated_again_replace_the_first(tmp_path, capsys) -> None:
    """A finished run started again evaluates its last step again: torch printed "Embedding dir exists" and
    kept the old folder's files beside the new."""
    points, labels = clustered(4, 10, 3, seed=1)
    for labs in (labels, labels + 10):
        logger = TensorBoardLogger(str(tmp_path), True)
        logger.log_embeddings(7, {"euclidean": points}, labs, None, max_points=40)
        logger.close()
    assert "Embedding dir exists" not in capsys.readouterr().out
    with open(os.path.join(logger.tb_dir, "00007", "euclidean", "metadata.tsv")) as f:
        assert {int(line) for line in f.read().split()} == {10, 11, 12, 13}  # the second evaluation's


def test_the_projector_gets_one_space_and_every_space_its_norm_histogram(tmp_path) -> None:
    """CHEST's three spaces at 768/512 dims wrote ~35 MB of projector text an evaluation: the ball's alone now."""
    emb, labels = clustered(3, 4, 5)
    spaces = {"euclidean": emb, "poincare": to_ball(emb, 0.5, 2.3), "fc_euclidean": emb * 2}
    logger = TensorBoardLogger(str(tmp_path), True)
    logger.log_embeddings(4, spaces, labels)
    logger.close()
    with open(tmp_path / "tb" / "projector_config.pbtxt") as f:
        assert [line.split('"')[1] for line in f if "tensor_name" in line] == ["poincare:00004"]
    histograms = read_events(logger.tb_dir).Tags()["histograms"]
    assert {f"eval/{space}_norm" for space in spaces} <= set(histograms)

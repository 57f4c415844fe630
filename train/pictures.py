"""Pictures of the embedding spaces at evaluation: the data behind them and matplotlib figures.

Everything renders off-screen through matplotlib's Agg canvas on a bare `Figure` (never pyplot:
no global backend or figure registry is touched) and comes back as a Figure or an RGB array; nothing
is written to disk. The numbers (disk projection, angles to anchors, radius errors, pair
similarities) are plain functions so they can be checked without looking at pixels.

Only rank 0 draws, from what rank 0 holds: the evaluation embeddings (gathered) and its own shard
of the class table. Anchor-based pictures therefore cover the classes of rank 0's shard, and say so.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from model.chest import ChestHead
from model.distarc import sphere_radii
from model.hyperbolic import to_ball
from model.proxies import ShardedHead

MAX_CLASSES = 20  # classes given their own colour; the rest are grey
MAX_SPHERE_LINES = 50  # at most this many radius lines, those of the classes drawn (a face run with S = 1: one)
LEGEND_CLASSES = 10  # coloured classes named in a picture's legend (the strong tab20 colours)
GREY = (0.6, 0.6, 0.6, 0.35)


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """The figure rendered by Agg as an [H, W, 3] uint8 array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def sample_rows(n: int, max_rows: int, seed: int = 0) -> torch.Tensor:
    """At most `max_rows` row indices of n in random order, the same for the same (n, seed): not the
    first rows (an evaluation split is often stored class by class), and drawn in an order that
    paints no class over all the others."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows]


def disk_projection(
    points: torch.Tensor, extra: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """2-D view of ball points that keeps each point's norm: x2 = unit(V^T x) * ||x||.

    V holds the top two singular directions of `points` about the ball's centre (not centred on their mean:
    points in a narrow cone away from the origin, as trunk features often are, had axes across the cone and
    each point's small offset from the mean set its angle, spreading a 27-degree cone around the whole disk);
    `extra` (e.g. proxies) goes through the same V. A point
    whose distance from the centre is its true ball norm stays inside the disk of the same radius.
    A point orthogonal to the plane is put on the first axis (its norm still kept). Rows that are not
    finite are left out of the axes (and come out non-finite: matplotlib draws them nowhere).
    """
    x = points.detach().double().cpu().reshape(points.shape[0], -1)
    dim = x.shape[1]
    if dim < 2:
        x = F.pad(x, (0, 2 - dim))
    fit = x[torch.isfinite(x).all(dim=1)]  # a diverging model's non-finite rows: no axes from them, drawn nowhere
    if fit.shape[0] >= 2:
        _, _, vh = torch.linalg.svd(fit, full_matrices=False)
        basis = vh[:2].t()
        if basis.shape[1] < 2:  # fewer distinct directions than 2: complete with any orthonormal vector
            basis = torch.linalg.qr(torch.cat([basis, torch.eye(x.shape[1], dtype=x.dtype)], dim=1))[0][:, :2]
    else:
        basis = torch.eye(x.shape[1], 2, dtype=x.dtype)

    def project(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().double().cpu().reshape(v.shape[0], -1)
        v = F.pad(v, (0, x.shape[1] - v.shape[1])) if v.shape[1] < x.shape[1] else v
        coords = v @ basis
        length = coords.norm(dim=1, keepdim=True)
        direction = torch.where(
            length > 1e-12, coords / length.clamp_min(1e-300), torch.tensor([1.0, 0.0], dtype=v.dtype)
        )
        return direction * v.norm(dim=1, keepdim=True)

    return project(x), None if extra is None else project(extra)


def angles_to_anchors(
    emb: torch.Tensor, labels: torch.Tensor, head: ShardedHead
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the samples whose class lies in this rank's shard of a DistArc-family head: the angle in
    degrees between x and its class direction w_y, and ||x||.

    Returns (kept sample indices, angles, norms); the other samples' anchors live on other ranks.
    """
    local = labels.cpu().long() - head.class_start
    keep = torch.nonzero((local >= 0) & (local < head.num_local)).flatten()
    x = emb.detach().float().cpu()[keep]
    w = head.sharded_parameters()["weight"].detach().float().cpu()[local[keep]]
    cos = (F.normalize(x, dim=1, eps=1e-12) * F.normalize(w, dim=1, eps=1e-12)).sum(dim=1).clamp(-1.0, 1.0)
    return keep, torch.rad2deg(torch.acos(cos)), x.norm(dim=1)


def radius_errors(emb: torch.Tensor, labels: torch.Tensor, head: ShardedHead) -> torch.Tensor:
    """||x|| - r_y for every sample: r_y is a pure function of the global class id (no table needed)."""
    cfg = head.cfg
    radii = sphere_radii(labels.cpu().long(), cfg.radius_start, cfg.radius_gap, cfg.num_spheres)
    return emb.detach().float().cpu().norm(dim=1) - radii


def pair_similarities(
    emb: torch.Tensor, labels: torch.Tensor, num_pairs: int = 2000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of up to `num_pairs` random positive pairs (same label, two different
    samples) and as many random negative pairs (different labels); seeded, so the same split and
    seed give the same pairs. Either tensor is empty where no such pair exists."""
    gen = torch.Generator().manual_seed(seed)
    lab = labels.cpu().long()
    x = emb.detach()
    n = lab.shape[0]
    empty = torch.zeros(0)
    if n < 2:
        return empty, empty
    order = torch.argsort(lab, stable=True)
    _, counts = torch.unique_consecutive(lab[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group_start, group_size = starts.repeat_interleave(counts), counts.repeat_interleave(counts)
    # positives: an anchor from a class with >= 2 samples, its partner another member of the class
    candidates = torch.nonzero(group_size >= 2).flatten()
    pos = empty
    if candidates.numel():
        a = candidates[torch.randint(candidates.numel(), (num_pairs,), generator=gen)]
        shift = 1 + (torch.rand(num_pairs, generator=gen) * (group_size[a] - 1)).long().clamp_max(group_size[a] - 2)
        b = group_start[a] + (a - group_start[a] + shift) % group_size[a]
        pos = _cosines(x, order[a], order[b])
    neg = empty
    if int(counts.numel()) >= 2:
        # rejection sampling; with >= 2 classes each draw is negative with probability >= ~1/n
        picked: list[torch.Tensor] = []
        found = 0
        for _ in range(64):
            i = torch.randint(n, (4 * num_pairs,), generator=gen)
            j = torch.randint(n, (4 * num_pairs,), generator=gen)
            ok = lab[i] != lab[j]
            picked.append(_cosines(x, i[ok], j[ok]))
            found += int(ok.sum())
            if found >= num_pairs:
                break
        neg = torch.cat(picked)[:num_pairs]
    return pos, neg


def _cosines(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """cos(x_i, x_j) row by row; only the sampled rows are normalised (and copied off the device)."""
    a = F.normalize(x[i.to(x.device)].float(), dim=1, eps=1e-12)
    b = F.normalize(x[j.to(x.device)].float(), dim=1, eps=1e-12)
    return (a * b).sum(dim=1).cpu()


def _class_colours(labels: np.ndarray, max_classes: int = MAX_CLASSES) -> tuple[dict[int, tuple], list[int]]:
    """A colour for each of the `max_classes` most frequent labels (ties: smaller id first). Given the whole
    set's labels, not the drawn sample's: the sample depends on the order the ranks' embeddings were gathered
    in, so a resume on another world size re-coloured every class."""
    ids, counts = np.unique(labels, return_counts=True)
    top = [int(c) for c in ids[np.lexsort((ids, -counts))][:max_classes]]
    palette = [tuple(float(v) for v in c) for c in _palette(len(top))]
    return dict(zip(top, palette)), top


def _palette(n: int) -> np.ndarray:
    from matplotlib import colormaps

    # tab20's strong colours first, then their light twins: the first ten classes are far apart
    order = np.r_[np.arange(0, 20, 2), np.arange(1, 20, 2)]
    return colormaps["tab20"](order[np.arange(n) % 20])


def _colours_of(labels: np.ndarray, colours: dict[int, tuple]) -> list[tuple]:
    return [colours.get(int(y), GREY) for y in labels]


def _class_legend(ax: Any, colours: dict[int, tuple], top: list[int], loc: str) -> None:
    """A legend of the first LEGEND_CLASSES coloured classes (their label ids) and the grey rest, kept beside
    any legend the axes already has."""
    shown = top[:LEGEND_CLASSES]
    handles = [Line2D([], [], marker="o", linestyle="", markersize=4, color=colours[y], label=str(y)) for y in shown]
    rest = len(top) - len(shown)
    if rest:
        handles.append(Line2D([], [], linestyle="", label=f"+{rest} coloured"))
    handles.append(Line2D([], [], marker="o", linestyle="", markersize=4, color=GREY, label="other classes"))
    before = ax.get_legend()
    ax.legend(handles=handles, loc=loc, fontsize=6, title="class", title_fontsize=6, ncol=2, framealpha=0.7)
    if before is not None:
        ax.add_artist(before)


def poincare_disk_figure(
    ball: torch.Tensor,
    labels: torch.Tensor,
    curvature: float,
    proxies: torch.Tensor | None = None,
    proxy_labels: torch.Tensor | None = None,
    max_points: int = 1000,
    title: str = "",
) -> Figure:
    """Ball points (and proxies) in the norm-keeping 2-D view, scaled by sqrt(c) to the unit disk.

    Points are coloured by label (the set's most frequent MAX_CLASSES classes; others grey); proxies of the
    coloured classes are drawn as larger outlined markers.
    """
    rows = sample_rows(ball.shape[0], max_points)
    scale = math.sqrt(curvature)
    pts = ball.detach().cpu()[rows] * scale
    lab = labels.cpu()[rows].numpy()
    colours, top = _class_colours(labels.cpu().numpy())
    prox = prox_lab = None
    if proxies is not None and proxy_labels is not None and proxies.numel():
        keep = torch.isin(proxy_labels.cpu(), torch.tensor(top, dtype=torch.long))
        prox, prox_lab = proxies.detach().cpu()[keep] * scale, proxy_labels.cpu()[keep].numpy()
    p2, e2 = disk_projection(pts, prox if prox is not None and prox.shape[0] else None)
    fig = Figure(figsize=(5.5, 5.5), dpi=100)
    ax = fig.add_subplot()
    t = np.linspace(0, 2 * np.pi, 361)
    ax.plot(np.cos(t), np.sin(t), color="black", linewidth=1.0)
    ax.scatter(p2[:, 0].numpy(), p2[:, 1].numpy(), s=6, c=_colours_of(lab, colours), linewidths=0)
    if e2 is not None and prox_lab is not None:
        ax.scatter(
            e2[:, 0].numpy(),
            e2[:, 1].numpy(),
            s=90,
            c=_colours_of(prox_lab, colours),
            marker="*",
            edgecolors="black",
            linewidths=0.6,
            label="proxies",
        )
        ax.legend(loc="lower right", fontsize=7)
    _class_legend(ax, colours, top, "upper left")
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect("equal")
    ax.set_title(title or f"Poincare disk (c={curvature:g}, radius scaled to 1): {len(rows)} points", fontsize=8)
    fig.tight_layout()
    return fig


def radial_angular_figure(
    angles_deg: torch.Tensor,
    norms: torch.Tensor,
    labels: torch.Tensor,
    sphere_radii_: list[float],
    max_points: int = 1000,
    title: str = "",
) -> Figure:
    """Angle to the own class's anchor (x) against ||x|| (y), with a line at each sphere radius."""
    rows = sample_rows(angles_deg.shape[0], max_points)
    lab = labels.cpu()[rows].numpy()
    colours, top = _class_colours(labels.cpu().numpy())
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    for radius in sphere_radii_[:MAX_SPHERE_LINES]:
        ax.axhline(radius, color="black", linewidth=0.6, linestyle="--", alpha=0.6)
    ax.scatter(angles_deg[rows].numpy(), norms[rows].numpy(), s=6, c=_colours_of(lab, colours), linewidths=0)
    _class_legend(ax, colours, top, "upper right")
    ax.set_xlim(0, 180)
    ax.set_xlabel("angle between x and its class direction w_y (degrees)")
    ax.set_ylabel("||x||")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def head_pictures(
    spaces: dict[str, torch.Tensor], labels: torch.Tensor, head: ShardedHead, closed_set: bool, max_points: int = 1000
) -> dict[str, Figure]:
    """The figures this head and evaluation set call for, by TensorBoard tag.

    `closed_set`: the labels are the head's classes (classification protocol); open-set labels
    (retrieval) are other classes, so anchors and proxies are left out of the pictures.
    """
    figures: dict[str, Figure] = {}
    cfg = head.cfg
    shard_note = (
        ""
        if head.num_local >= head.num_classes
        else f"\nanchors: rank 0's classes only ({head.num_local} of {head.num_classes})"
    )
    if "poincare" in spaces:
        ch = cfg.chest
        prox = prox_lab = None
        if closed_set and isinstance(head, ChestHead) and head.fc is not None:
            table = head.sharded_parameters()["proxies"].detach()
            rows = torch.arange(head.class_start, head.class_start + head.num_local, device=table.device)
            local_labels = head.class_unperm[rows].cpu()  # table row -> label
            # only the classes of the points drawn (the figure's sample): not the whole shard through h
            drawn = labels.cpu()[sample_rows(labels.shape[0], max_points)]
            mine = torch.isin(local_labels, drawn)
            with torch.no_grad():
                mapped = head.fc(table[mine.to(table.device)].reshape(-1, table.shape[-1]).float())
                prox = to_ball(mapped, ch.curvature, ch.clip_radius)
            prox_lab = local_labels[mine].repeat_interleave(table.shape[1])
        note = (
            ", stars: proxies" + shard_note
            if prox is not None
            else ""
            if closed_set
            else "\nopen-set labels: no proxies"
        )
        n = min(spaces["poincare"].shape[0], max_points)
        figures["eval/poincare_disk"] = poincare_disk_figure(
            spaces["poincare"],
            labels,
            ch.curvature,
            prox,
            prox_lab,
            max_points,
            title=f"Poincare disk (c={ch.curvature:g}, scaled to radius 1), {n} points{note}",
        )
    if cfg.name == "distarc" and closed_set and "euclidean" in spaces:
        keep, angles, norms = angles_to_anchors(spaces["euclidean"], labels, head)
        if keep.numel():
            # the radii of the classes drawn (S = C puts every class on its own sphere: the first 50 left most
            # points above every line), evenly thinned to MAX_SPHERE_LINES
            radii = sorted(
                set(sphere_radii(labels.cpu()[keep], cfg.radius_start, cfg.radius_gap, cfg.num_spheres).tolist())
            )
            shown = radii[:: -(-len(radii) // MAX_SPHERE_LINES)]
            which = "sphere radii" if len(shown) == len(radii) else f"{len(shown)} of its {len(radii)} sphere radii"
            n = min(int(keep.numel()), max_points)
            figures["eval/radial_angular"] = radial_angular_figure(
                angles,
                norms,
                labels.cpu()[keep],
                shown,
                max_points,
                title=f"DistArc: angle to own anchor vs norm, {n} points, dashed: the classes' {which}{shard_note}",
            )
    return figures

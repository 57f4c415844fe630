"""CHEST (Saeki et al., arXiv 2510.05643) and its SoftTriple baseline on class-sharded proxies.

Euclidean proxies P_E [C, K, D_E] are split by contiguous class ranges (all K proxies of a class
on one rank, so the intra-class soft-min stays local); the shared FC h is replicated. Per rank:
gather x^E, map x^E and the local proxies into the Poincare ball with the same h (clip + expmap0),
soft-min distances in both spaces, two class softmaxes spanning the ranks, and the HypHC
regulariser on proxy triplets whose negatives come from a rotating peer rank (docs/losses.md 3.4 b).
Symbols follow docs/losses.md section 2.

Partial-FC (loss.sample_rate < 1): each step a rank keeps the gathered batch's positives in its shard
plus random negatives (model.proxies.sample_local_classes, seeded by (init_seed, step, class_start) as
DistArc), and the class softmaxes of both spaces span only the kept columns, so the [G, C, K] blocks
shrink with the rate and the class terms' gradient reaches only the kept proxies. The regulariser
(HypHC, or SoftTriple's centre term) still sees every local proxy, as the spec's one triplet per class
(M = C) asks: HypHC maps all C_local x K proxies through h once (independent of G; the class terms reuse
the kept rows of that mapping), and it is the only gradient the unsampled proxies get (the head optimizer
stays dense, as arcface_torch's PartialFC v2: AdamW moments and weight decay still move rows whose gradient
is zero this step, by about one step's size; train/engine.py head_optimizer). HypHC's triplets and
per-triplet loss live in model.hyphc. With loss.class_chunk the class softmaxes and HypHC run over chunks of
classes recomputed in backward (model.chunked_softmax), and no mapping of the whole table is kept.

Legend: G global batch, C classes here, K proxies per class, E = D_E, H = D_H, T triplets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from common.seeds import stable_seed
from model import hyperbolic as hyp
from model.chunked_softmax import (
    GatheredTerm,
    chunked_cross_entropy_and_sum,
    chunked_sharded_argmin,
    chunked_sharded_cross_entropy,
    gathered_sum,
    gathered_term,
)
from model.collectives import (
    all_gather_and_exchange,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_sum_no_grad,
    sharded_cross_entropy,
)
from model.config import LossConfig, has_shared_fc
from model.hyphc import Triplets, hyphc_triplet_loss, sample_triplets
from model.proxies import ShardedHead, class_permutation, class_range, init_rows, sample_local_classes
from model.proxies import check_label_range


# ---- building blocks (pure functions) -----------------------------------------------------------


def euclidean_pairwise(x_ND: torch.Tensor, p_MD: torch.Tensor) -> torch.Tensor:
    """||x - p|| (not squared) by the Gram form; sqrt(. + eps) keeps gradients finite at 0."""
    x, p = x_ND.float(), p_MD.float()
    sq = ((x * x).sum(1)[:, None] + (p * p).sum(1)[None, :] - 2 * x @ p.t()).clamp_min(0.0)
    return torch.sqrt(sq + hyp.SQRT_EPS)


def soft_min_similarity(d_GCK: torch.Tensor, gamma: float) -> torch.Tensor:
    """S = -sum_k pi_k d_k with pi = softmax_k(-d / gamma) (Eq. 5-6); pi is not detached."""
    return -(torch.softmax(-d_GCK / gamma, dim=2) * d_GCK).sum(dim=2)


def soft_max_similarity(s_GCK: torch.Tensor, gamma: float) -> torch.Tensor:
    """SoftTriple's relaxed class similarity: sum_k softmax_k(s / gamma) s_k."""
    return (torch.softmax(s_GCK / gamma, dim=2) * s_GCK).sum(dim=2)


def margin_logits(
    sim_GC: torch.Tensor, target_col_G: torch.Tensor, lam: float, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda * (S - delta [c = y]) and the target logit (meaningful where target_col >= 0)."""
    num_local = sim_GC.shape[1]
    if num_local == 0:
        return lam * sim_GC, torch.zeros(sim_GC.shape[0], dtype=sim_GC.dtype, device=sim_GC.device)
    col = target_col_G.clamp(0, num_local - 1)
    onehot = F.one_hot(col, num_local).to(sim_GC.dtype) * (target_col_G >= 0)[:, None].to(sim_GC.dtype)
    logits = lam * (sim_GC - delta * onehot)
    return logits, logits.gather(1, col[:, None]).squeeze(1)


def softtriple_regulariser(p_CKD: torch.Tensor) -> torch.Tensor:
    """sum_c sum_{k<k'} sqrt(2 + 1e-5 - 2 <w_ck, w_ck'>) over unit centres (unnormalised sum).

    The cosines come from the raw Gram and the norms: no normalised [C, K, D] copy of the table is kept for
    backward (with Partial-FC this term, over every proxy, would otherwise set SoftTriple's memory floor).
    """
    p = p_CKD.float()
    inv = 1.0 / torch.linalg.vector_norm(p, dim=2).clamp_min(1e-12)  # [C, K]; F.normalize's eps
    gram = (p @ p.transpose(1, 2)) * inv[:, :, None] * inv[:, None, :]  # [C, K, K]
    k = gram.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=gram.device), diagonal=1)
    return torch.sqrt(2.0 + 1e-5 - 2.0 * gram[:, upper]).sum()


# ---- the loss over one table slice (sharded or whole) -------------------------------------------


def _class_ce(
    logits: torch.Tensor, target: torch.Tensor, target_col: torch.Tensor, group: ProcessGroup | None, dense: bool
) -> torch.Tensor:
    if dense:
        return torch.logsumexp(logits, dim=1) - target
    return sharded_cross_entropy(logits, target, target_col >= 0, group)


def class_similarities(
    x_GE: torch.Tensor,
    proxies_CKE: torch.Tensor,
    fc: nn.Module | None,
    cfg: LossConfig,
    proxies_h_CKH: torch.Tensor | None = None,
    map_for_regulariser: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Soft class similarities S [G, C] per space, and the proxies mapped into the ball [C, K, H].

    Spaces: "euclidean" and "poincare" for CHEST (those with eta > 0), "cosine" for SoftTriple.
    `proxies_h_CKH`: these proxies already mapped (Partial-FC shares the regulariser's mapping), else mapped here.
    `map_for_regulariser`: map them (for HypHC, tau > 0) even where no Poincare softmax needs them.
    """
    ch = cfg.chest
    x = x_GE.float()
    num_local, k, dim_e = proxies_CKE.shape
    flat = proxies_CKE.reshape(num_local * k, dim_e).float()
    if cfg.name == "softtriple":
        sims = (F.normalize(x, dim=1) @ F.normalize(flat, dim=1).t()).view(x.shape[0], num_local, k)
        return {"cosine": soft_max_similarity(sims, ch.gamma_e)}, None
    assert fc is not None, "CHEST needs its shared FC h"
    out: dict[str, torch.Tensor] = {}
    if ch.eta_e > 0:
        feats, prox = (fc(x), fc(flat)) if ch.euclid_features == "head" else (x, flat)
        out["euclidean"] = soft_min_similarity(
            euclidean_pairwise(feats, prox).view(x.shape[0], num_local, k), ch.gamma_e
        )
    prox_h = None if proxies_h_CKH is None else proxies_h_CKH.reshape(num_local * k, proxies_h_CKH.shape[-1])
    if prox_h is None and (ch.eta_h > 0 or (ch.tau > 0 and map_for_regulariser)):
        prox_h = hyp.to_ball(fc(flat), ch.curvature, ch.clip_radius)
    if ch.eta_h > 0:
        assert prox_h is not None
        x_h = hyp.to_ball(fc(x), ch.curvature, ch.clip_radius)
        d_h = hyp.pairwise_dist(x_h, prox_h, ch.curvature).view(x.shape[0], num_local, k)
        out["poincare"] = soft_min_similarity(d_h, ch.gamma_h)
    return out, None if prox_h is None else prox_h.view(num_local, k, prox_h.shape[-1])


def class_softmaxes(cfg: LossConfig) -> dict[str, tuple[str, float, float, float]]:
    """The head's class softmaxes, in class_similarities' order: space -> (output key, lambda, delta, eta).
    SoftTriple's cosine space uses the Euclidean fields (and no eta); a CHEST space with eta = 0 is absent."""
    ch = cfg.chest
    if cfg.name == "softtriple":
        return {"cosine": ("loss_e_G", ch.lambda_e, ch.delta_e, 1.0)}
    spaces = {
        "euclidean": ("loss_e_G", ch.lambda_e, ch.delta_e, ch.eta_e),
        "poincare": ("loss_h_G", ch.lambda_h, ch.delta_h, ch.eta_h),
    }
    return {space: terms for space, terms in spaces.items() if terms[3] > 0}


def class_terms(
    x_GE: torch.Tensor,
    target_col_G: torch.Tensor,
    proxies_CKE: torch.Tensor,
    fc: nn.Module | None,
    cfg: LossConfig,
    group: ProcessGroup | None = None,
    dense: bool = False,
    proxies_h_CKH: torch.Tensor | None = None,
    riding: tuple[GatheredTerm, torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample class losses of CHEST (or SoftTriple) against one slice of the proxy table.

    Returns "loss_G" (eta-weighted sum), the per-space "loss_e_G"/"loss_h_G" and, when h exists and the
    shard is taken whole, "proxies_h" [C, K, H] (the mapped proxies, reused by HypHC). With loss.class_chunk
    (sharded only) each space's softmax runs over chunks of classes recomputed in backward
    (model/chunked_softmax.py): no [G, C, K] block of the whole shard exists. `riding` (chunked only): a
    gathered sum over these same proxies and its extra rows (HypHC), computed in the class terms' autograd
    node so that both write one table gradient; its value is "riding_sum".
    """
    spec = class_softmaxes(cfg)
    out: dict[str, torch.Tensor] = {}
    if cfg.class_chunk > 0 and not dense:
        losses = _chunked_space_losses(x_GE, target_col_G, proxies_CKE, fc, cfg, group, spec, riding, out)
    elif riding is not None:
        raise ValueError("a riding term needs the chunked class terms (loss.class_chunk > 0, sharded)")
    else:
        sims, prox_h = class_similarities(x_GE, proxies_CKE, fc, cfg, proxies_h_CKH)
        losses = {}
        for space, sim in sims.items():
            logits, target = margin_logits(sim, target_col_G, spec[space][1], spec[space][2])
            losses[space] = _class_ce(logits, target, target_col_G, group, dense)
        if prox_h is not None:
            out["proxies_h"] = prox_h
    total = torch.zeros(x_GE.shape[0], device=x_GE.device)
    for space, loss_G in losses.items():
        key, _, _, eta = spec[space]
        out[key] = loss_G
        total = total + eta * loss_G
    out["loss_G"] = total
    return out


def _chunked_space_losses(
    x_GE: torch.Tensor,
    target_col_G: torch.Tensor,
    proxies_CKE: torch.Tensor,
    fc: nn.Module | None,
    cfg: LossConfig,
    group: ProcessGroup | None,
    spec: dict[str, tuple[str, float, float, float]],
    riding: tuple[GatheredTerm, torch.Tensor | None] | None = None,
    out: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each space's per-sample class loss, loss.class_chunk classes at a time (one autograd node for all,
    the riding term's too: its value goes to out["riding_sum"])."""

    def chunk_logits(
        x: torch.Tensor, rows: torch.Tensor, start: int, cols: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], None]:
        sims, _ = class_similarities(x, rows, fc, cfg, map_for_regulariser=False)
        pairs = [margin_logits(sims[space], cols, lam, delta) for space, (_, lam, delta, _) in spec.items()]
        return [logits for logits, _ in pairs], [target for _, target in pairs], None

    params = [] if fc is None else list(fc.parameters())
    if riding is None:
        loss_NG, _ = chunked_sharded_cross_entropy(
            chunk_logits, x_GE.float(), proxies_CKE, target_col_G, cfg.class_chunk, group, params, len(spec)
        )
    else:
        term, extra = riding
        loss_NG, total = chunked_cross_entropy_and_sum(
            chunk_logits,
            x_GE.float(),
            proxies_CKE,
            target_col_G,
            cfg.class_chunk,
            term,
            extra,
            group,
            params,
            len(spec),
        )
        if out is not None:
            out["riding_sum"] = total
    return dict(zip(spec, loss_NG.unbind(0), strict=True))


def _rows(prox_CKH: torch.Tensor, cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """prox[cls, k] with out-of-range (invalid) class indices clamped; callers mask those out."""
    if prox_CKH.shape[0] == 0:
        return torch.zeros((cls.shape[0], prox_CKH.shape[2]), device=prox_CKH.device)
    return prox_CKH[cls.clamp(0, prox_CKH.shape[0] - 1), k]


class ChestHead(ShardedHead):
    """This rank's CHEST proxies [C_local, K, D_E], the replicated shared FC h, and the sharded loss."""

    class_perm: torch.Tensor
    class_unperm: torch.Tensor

    def __init__(
        self,
        cfg: LossConfig,
        num_classes: int,
        embed_dim: int,
        rank: int = 0,
        world_size: int = 1,
        group: ProcessGroup | None = None,
        embedding_grad_scale: float = 1.0,
    ) -> None:
        super().__init__()
        ch = cfg.chest
        self.cfg, self.num_classes, self.embed_dim = cfg, num_classes, embed_dim
        self.rank, self.world_size, self.group = rank, world_size, group
        self.embedding_grad_scale = embedding_grad_scale
        self.class_start, self.num_local = class_range(num_classes, rank, world_size)
        rows = init_rows(cfg.init_seed, self.class_start, self.num_local, (ch.proxies_per_class, embed_dim))
        self.proxies = nn.Parameter(rows * ch.proxy_init_std)
        self.fc: nn.Linear | None = None
        if has_shared_fc(cfg):  # identical on every rank: orthogonal weight, zero bias (as Hyp-ViT)
            self.fc = nn.Linear(embed_dim, ch.hyp_dim)
            nn.init.orthogonal_(self.fc.weight, generator=torch.Generator().manual_seed(cfg.init_seed + 1))
            nn.init.zeros_(self.fc.bias)
        perm = class_permutation(num_classes, cfg.init_seed) if ch.permute_classes else torch.arange(num_classes)
        self.register_buffer("class_perm", perm, persistent=False)  # label -> table row
        self.register_buffer("class_unperm", torch.argsort(perm), persistent=False)  # table row -> label

    def sharded_parameters(self) -> dict[str, nn.Parameter]:
        return {"proxies": self.proxies}

    def replicated_parameters(self) -> dict[str, nn.Parameter]:
        return {} if self.fc is None else dict(self.fc.named_parameters(prefix="fc"))

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """Loss of the global batch (same value on every rank) and its detached parts."""
        if emb_BD.shape[-1] != self.embed_dim:
            raise ValueError(
                f"embedding dimension {emb_BD.shape[-1]} != head's {self.embed_dim}: "
                "set model.embed_dim to the dimension the proxies were built with"
            )
        trip = self._triplets(step)
        if trip is not None and trip.offset > 0:
            # The negatives for our anchors live on rank src; we serve rank dst's anchors from our rows.
            # The exchange rides in the all-gather's autograd node (see collectives.all_gather_and_exchange).
            dst = (self.rank + trip.offset) % self.world_size
            src = (self.rank - trip.offset) % self.world_size
            d_lo, d_n = class_range(self.num_classes, dst, self.world_size)
            served = self._triplets(step, range(d_lo, d_lo + d_n))
            assert served is not None
            send = _rows(self.proxies, served.neg_class - self.class_start, served.neg_k)
            x_GE, neg_e = all_gather_and_exchange(
                emb_BD.float(), send, dst, src, self.num_local, self.group, self.embedding_grad_scale
            )
        else:
            x_GE = all_gather_with_grad(emb_BD.float(), self.group, self.embedding_grad_scale)
            neg_e = None
        labels_G = all_gather_no_grad(labels_B, self.group)
        check_label_range(labels_G, self.num_classes)
        target_col = self.target_columns(labels_G)
        proxies: torch.Tensor = self.proxies
        sampled = self.cfg.sample_rate < 1.0
        chunked = self.cfg.class_chunk > 0
        all_h = kept_h = None
        if sampled and not chunked and trip is not None:  # HypHC needs every local proxy in the ball: map them once
            all_h = self._proxies_in_ball()
        if sampled:  # Partial-FC: the batch's positives and a random share of the other local classes
            index, target_col = self.sample_columns(target_col, step)
            proxies = proxies[index]
            kept_h = None if all_h is None else all_h[index]  # the class terms share the regulariser's mapping
        # chunked and exact, HypHC rides in the class terms' node: one table gradient for both, not two
        riding = (self._hyphc_term(trip, neg_e), neg_e) if chunked and not sampled and trip is not None else None
        terms = class_terms(
            x_GE, target_col, proxies, self.fc, self.cfg, self.group, proxies_h_CKH=kept_h, riding=riding
        )
        out = {"loss": terms["loss_G"].mean()}
        for key in ("loss_e_G", "loss_h_G"):
            if key in terms:
                out[key[:-2]] = terms[key].detach().mean()
        if self.cfg.chest.tau > 0:
            if riding is not None:
                local_reg = self.cfg.chest.tau / self.num_classes * terms["riding_sum"]
            elif chunked and trip is not None:
                local_reg = self._hyphc_chunked(trip, neg_e)
            else:
                local_reg = self._regulariser(all_h if all_h is not None else terms.get("proxies_h"), trip, neg_e)
            global_reg = all_reduce_sum_no_grad(local_reg, self.group)
            # value: the global sum; gradient: this rank's own triplets (peers' reach us via the exchange)
            out["loss"] = out["loss"] + local_reg - local_reg.detach() + global_reg
            out["regulariser"] = global_reg
        return out

    def target_columns(self, labels_G: torch.Tensor) -> torch.Tensor:
        """Local table column of each label's class (after the class permutation), -1 where not ours."""
        local = self.class_perm[labels_G] - self.class_start
        return torch.where((local >= 0) & (local < self.num_local), local, -1)

    def sample_columns(self, target_col_G: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial-FC's kept local columns (sorted) at `step` and the targets renumbered into them.

        A pure function of (init_seed, step, class_start, the batch's positives), DistArc's seeding:
        every rank draws its own set without communication, and a resumed run redraws the same sets.
        """
        gen = torch.Generator().manual_seed(stable_seed(self.cfg.init_seed, step, self.class_start))
        return sample_local_classes(target_col_G, self.num_local, self.cfg.sample_rate, gen)

    def _proxies_in_ball(self) -> torch.Tensor:
        """All local proxies through h and the map [C, K, H], from a view of the table (no [C K, D_E] copy)."""
        assert self.fc is not None
        ch = self.cfg.chest
        flat = self.proxies.reshape(-1, self.embed_dim).float()
        return hyp.to_ball(self.fc(flat), ch.curvature, ch.clip_radius).view(
            self.num_local, ch.proxies_per_class, ch.hyp_dim
        )

    def _triplets(self, step: int, anchors: range | None = None) -> Triplets | None:
        """The step's HypHC triplets of `anchors` (default: this rank's classes); None without HypHC."""
        ch, own = self.cfg.chest, range(self.class_start, self.class_start + self.num_local)
        if self.cfg.name != "chest" or ch.tau <= 0:
            return None
        args = (self.num_classes, ch.proxies_per_class, self.world_size, self.cfg.init_seed, step, ch.hyphc_negatives)
        return sample_triplets(*args, own if anchors is None else anchors)

    def _regulariser(
        self, prox_h: torch.Tensor | None, trip: Triplets | None, neg_e: torch.Tensor | None
    ) -> torch.Tensor:
        """(tau / M) * this rank's share of the regulariser (HypHC, or SoftTriple's centre term), over every
        local proxy whatever loss.sample_rate (`prox_h`: all of them mapped into the ball)."""
        ch = self.cfg.chest
        if trip is None:  # SoftTriple
            k = ch.proxies_per_class
            return ch.tau * softtriple_regulariser(self.proxies) / (self.num_classes * k * (k - 1))
        assert prox_h is not None and self.fc is not None
        rows = torch.arange(self.num_local, device=prox_h.device)
        p1, p2 = _rows(prox_h, rows, trip.pos_i), _rows(prox_h, rows, trip.pos_j)
        if neg_e is None:
            p3 = _rows(prox_h, trip.neg_class - self.class_start, trip.neg_k)
        else:  # received Euclidean rows, mapped here by the replicated h (its grads are summed later)
            p3 = hyp.to_ball(self.fc(neg_e), ch.curvature, ch.clip_radius)
        valid = trip.valid.to(prox_h.device, prox_h.dtype)
        return ch.tau / self.num_classes * (hyphc_triplet_loss(p1, p2, p3, ch) * valid).sum()

    def _hyphc_chunked(self, trip: Triplets, neg_e: torch.Tensor | None) -> torch.Tensor:
        """`_regulariser`'s HypHC term over loss.class_chunk anchor classes at a time, recomputed in backward
        (model.chunked_softmax.gathered_sum): only the triplets' proxies go through h and into the
        ball, and no mapping of the whole table waits for backward (with K = 2 and D_H = 384 that graph
        was ~30 KB per class). Partial-FC's path; the exact one rides in the class terms' node."""
        assert self.fc is not None
        total = gathered_sum(self._hyphc_term(trip, neg_e), self.proxies, neg_e, list(self.fc.parameters()))
        return self.cfg.chest.tau / self.num_classes * total

    def _hyphc_term(self, trip: Triplets, neg_e: torch.Tensor | None) -> GatheredTerm:
        """This rank's HypHC triplet losses as a sum over gathered rows of the table's [C K, D_E] view (plus
        the received negatives as extra rows), loss.class_chunk anchor classes per chunk; unscaled by tau / M."""
        assert self.fc is not None
        ch, lo, n = self.cfg.chest, self.class_start, self.num_local
        k = ch.proxies_per_class
        anchors = torch.arange(n)
        # rows of the table's [C K, D_E] view: row c * K + j is proxy j of local class c
        gathers = [anchors * k + trip.pos_i, anchors * k + trip.pos_j]
        if neg_e is None:  # local negatives: rows of this table (peer ones arrive as neg_e, row i for anchor i)
            gathers.append((trip.neg_class - lo).clamp(0, max(n - 1, 0)) * k + trip.neg_k)
        valid = trip.valid.to(self.proxies.device, torch.float32)

        def block(rows: list[torch.Tensor], start: int, stop: int) -> torch.Tensor:
            p1, p2, p3 = (self._to_ball(r) for r in rows)
            return (hyphc_triplet_loss(p1, p2, p3, ch) * valid[start:stop]).sum()

        return gathered_term(block, self.proxies, gathers, self.cfg.class_chunk, neg_e)

    def _to_ball(self, rows_ND: torch.Tensor) -> torch.Tensor:
        """Euclidean rows through the shared FC h and into the Poincare ball (clip, expmap0)."""
        assert self.fc is not None
        ch = self.cfg.chest
        return hyp.to_ball(self.fc(rows_ND.float()), ch.curvature, ch.clip_radius)

    @torch.no_grad()
    def embed_spaces(self, emb_GE: torch.Tensor) -> dict[str, torch.Tensor]:
        """Retrieval embeddings: x^E (Euclidean and cosine); for CHEST also x^H in the ball (Poincare) and
        h(x^E) before the map (fc_euclidean: the Euclidean space of the eta_H = 0 ablation)."""
        x = emb_GE.float()
        out = {"euclidean": x, "cosine": x}
        if self.fc is not None:
            ch = self.cfg.chest
            h = self.fc(x)
            out["poincare"] = hyp.to_ball(h, ch.curvature, ch.clip_radius)
            out["fc_euclidean"] = h
        return out

    @torch.no_grad()
    def predict(self, emb_GD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label of the class with the highest soft similarity, per space."""

        def values(start: int, stop: int) -> dict[str, torch.Tensor]:
            sims, _ = class_similarities(emb_GD, self.proxies[start:stop], self.fc, self.cfg, map_for_regulariser=False)
            return {space: -sim for space, sim in sims.items()}

        chunk = self.cfg.class_chunk or self.num_local  # loss.class_chunk bounds evaluation's blocks too
        rows = chunked_sharded_argmin(values, self.num_local, chunk, self.class_start, self.group)
        return {space: self.class_unperm[row] for space, row in rows.items()}


def chest_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    cfg: LossConfig,
    fc: nn.Module | None = None,
    triplets: Triplets | None = None,
) -> torch.Tensor:
    """Single-process CHEST (or SoftTriple) loss against the whole table `proxies` [C, K, D_E].

    `labels` index rows of `proxies` directly (no permutation). HypHC uses `triplets` (e.g. from
    `sample_triplets(C, K, world_size, seed, step, mode)`), one per class, scaled by tau / C.
    """
    terms = class_terms(emb, labels, proxies, fc, cfg, dense=True)
    loss = terms["loss_G"].mean()
    ch = cfg.chest
    if ch.tau <= 0:
        return loss
    num_classes, k = proxies.shape[0], ch.proxies_per_class
    if cfg.name == "softtriple":
        return loss + ch.tau * softtriple_regulariser(proxies) / (num_classes * k * (k - 1))
    if triplets is None:
        triplets = sample_triplets(num_classes, k, 1, cfg.init_seed, 0, "local")
    if triplets.anchors != range(num_classes):
        raise ValueError(f"triplets of anchors {triplets.anchors}: chest_loss needs one for each of the {num_classes}")
    prox_h = terms["proxies_h"]
    rows = torch.arange(num_classes)
    p1, p2 = prox_h[rows, triplets.pos_i], prox_h[rows, triplets.pos_j]
    p3 = prox_h[triplets.neg_class.clamp(0, num_classes - 1), triplets.neg_k]
    per = hyphc_triplet_loss(p1, p2, p3, ch) * triplets.valid.to(p1.dtype)
    return loss + ch.tau / num_classes * per.sum()

"""Configuration of the backbone (`ModelConfig`) and of the loss head (`LossConfig`).

Both are plain typed dataclasses; `train.config.RunConfig` composes them. Each `validate()` raises
`ValueError` naming the setting and what to change.
"""

from __future__ import annotations

import dataclasses
import math

HEAD_NAMES = ("distarc", "arcface", "cosface", "softmax", "chest", "softtriple")
DISTARC_FORMS = ("paper", "official")
HYPHC_NEGATIVES = ("peer", "local")
EUCLID_FEATURES = ("backbone", "head")
COMPILE_SCOPES = ("blocks", "model")


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """The embedding network: a timm trunk chosen by name plus (optionally) a linear neck to `embed_dim`."""

    name: str = "resnet10t"  # any timm model name; vit_large_patch16_224 for the full-size runs
    embed_dim: int = 64
    # true: a Linear neck maps the trunk's pooled features to embed_dim; false: the embedding is the trunk's
    # own output (CHEST's x^E is the ViT's CLS output), and embed_dim must equal the trunk's width
    neck: bool = True
    in_chans: int = 3
    # a ViT's image size (0 = the model's default, which must then be data.image_size: train.config.
    # check_trunk_image_size); trunks that take any size (CNNs) have none: 0
    img_size: int = 0
    patch_size: int = 0  # override a ViT's patch size for small images (0 = the model's default)
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    # torch.compile the backbone (inductor): faster steps after a compile at the first step of each process;
    # evaluation runs the same compiled code
    compile: bool = False
    # what model.compile compiles (train/blocks.compile_trunk). "blocks": each trunk block's forward (the
    # repeated transformer/stage block: one graph that all blocks reuse, a fraction of the compile; DeepSpeed's
    # hooks stay outside, so ZeRO-3's leaf-block fetches do not break the graph); "model": DeepSpeed's
    # engine.compile() of the whole trunk, its hooks traced with it (graph breaks and recompiles at ZeRO-3).
    # Trunks without blocks (ResNets): "model".
    compile_scope: str = "blocks"
    # optional local timm/torch checkpoint to start the trunk from (e.g. ImageNet-21k weights); its classifier
    # is dropped and ViT position embeddings are resampled to img_size (model.backbone.load_trunk_weights)
    checkpoint_path: str = ""
    # the recipe's numbers come from pretrained weights (the CHEST recipes: ImageNet-21k ViT-S/16, paper 4.2):
    # a run without model.checkpoint_path is refused before anything is built or queued (model.backbone.
    # check_trunk_weights); false trains from random weights on purpose
    needs_checkpoint: bool = False

    def validate(self) -> None:
        if not self.name:
            raise ValueError("model.name is empty: give a timm model name, e.g. model.name=resnet10t")
        # timm fetches such a model's config from the Hugging Face Hub (it reads the prefix in any case, "_" or "-")
        if self.name.split(":", 1)[0].lower().replace("_", "-") == "hf-hub" and ":" in self.name:
            raise ValueError(
                f"model.name={self.name!r} names a Hugging Face Hub model, and nothing is downloaded: give timm's "
                "architecture name (e.g. vit_small_patch16_224) and the weights as model.checkpoint_path=FILE"
            )
        if self.embed_dim < 1:
            raise ValueError(f"model.embed_dim={self.embed_dim} must be >= 1")
        if self.in_chans not in (1, 3):
            raise ValueError(f"model.in_chans={self.in_chans} must be 1 or 3")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if self.img_size < 0 or self.patch_size < 0:
            raise ValueError("model.img_size and model.patch_size must be >= 0 (0 = the model's default)")
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"model.compile_scope={self.compile_scope!r} must be one of {', '.join(COMPILE_SCOPES)}")


# SoftTriple's published constants (docs/losses.md 2.4), as overrides; CHEST's defaults are not them
SOFTTRIPLE_CONSTANTS = "loss.chest.gamma_e=0.1 lambda_e=20 delta_e=0.01 tau=0.2 proxies_per_class=10"


@dataclasses.dataclass(kw_only=True)
class ChestConfig:
    """CHEST (Saeki et al., arXiv 2510.05643; docs/losses.md section 2) and its SoftTriple baseline.

    Defaults are the paper's common settings (c = 0.5, clip 2.3, gamma 5, lambda 20, eta 1, tau 0.5)
    with the SOP margins (delta_H, delta_E) = (1, 5). The Table 6-7 ablations are config only:
    L_H only = eta_e=0; L_E only = eta_h=0 euclid_features=head; K=1 needs tau=0; tau=0 drops HypHC.
    For loss.name=softtriple the Euclidean fields are SoftTriple's: cosine similarity, inner
    temperature gamma_e (0.1), scale lambda_e (20), margin delta_e (0.01), centre regulariser tau (0.2).
    """

    proxies_per_class: int = 2  # K; all K proxies of a class live on one rank
    hyp_dim: int = 384  # D_H, output of the shared FC h
    curvature: float = 0.5  # c > 0; the ball has radius 1/sqrt(c)
    clip_radius: float = 2.3  # feature clipping before expmap0 (0 = off)
    gamma_e: float = 5.0  # intra-class soft-min temperatures
    gamma_h: float = 5.0
    lambda_e: float = 20.0  # class-softmax scales
    lambda_h: float = 20.0
    delta_e: float = 5.0  # margins, in distance units
    delta_h: float = 1.0
    eta_e: float = 1.0  # weights of the two spaces (Eq. 10)
    eta_h: float = 1.0
    tau: float = 0.5  # HypHC weight (SoftTriple: centre-regulariser weight)
    gamma_hyp: float = 1.0  # HypHC pair-softmax temperature
    hyphc_sign: int = 1  # +1: the printed softmax(+d/gamma) (default); -1: HypHC-faithful softmax(-d/gamma)
    hyphc_detach_sim: bool = False  # treat S_ab = exp(-d_ab) as constants (HIER/HypHC style)
    # "peer": rotating-peer exchange (docs/losses.md 3.4 b); "local": own class range only
    hyphc_negatives: str = "peer"
    euclid_features: str = "backbone"  # L_E on x^E ("backbone") or on h(x^E) ("head", the eta_h=0 ablation)
    permute_classes: bool = True  # shuffle class ids before sharding (SOP/In-shop ids are grouped)
    proxy_init_std: float = 1.0  # Gaussian init of the Euclidean proxies

    def validate(self, head: str) -> None:
        if self.proxies_per_class < 1:
            raise ValueError(f"loss.chest.proxies_per_class={self.proxies_per_class} must be >= 1")
        if self.proxies_per_class < 2 and self.tau > 0:
            raise ValueError(
                f"loss.chest.proxies_per_class={self.proxies_per_class} < 2 with loss.chest.tau="
                f"{self.tau} > 0: HypHC / the centre regulariser need two proxies per class; set tau=0"
            )
        if not self.curvature > 0:
            raise ValueError(f"loss.chest.curvature={self.curvature} must be > 0 (curvature of the ball is -c)")
        # Two points clipped at r sit up to artanh(tanh(2 sqrt(c) r)) apart (in units of 2/sqrt(c)); past
        # sqrt(c) r ~ 3.6 that reaches model.hyperbolic's artanh clamp (1 - 1e-6, needed for fp32), and far
        # pairs all get one distance with zero gradient (c = 3, r = 2.3: 8.37 for true 9.0-9.2); 3.0 keeps a margin
        if self.clip_radius > 0 and math.sqrt(self.curvature) * self.clip_radius > 3.0:
            raise ValueError(
                f"loss.chest.curvature={self.curvature} with clip_radius={self.clip_radius}: sqrt(c) * r = "
                f"{math.sqrt(self.curvature) * self.clip_radius:.2f} > 3.0 nears the fp32 Poincare distance's "
                "saturation; "
                f"lower the clip radius to <= {3.0 / math.sqrt(self.curvature):.2f} or the curvature"
            )
        if self.hyp_dim < 1 or self.gamma_e <= 0 or self.gamma_h <= 0 or self.gamma_hyp <= 0:
            raise ValueError("loss.chest.hyp_dim and the temperatures gamma_e, gamma_h, gamma_hyp must be > 0")
        if self.hyphc_sign not in (-1, 1):
            raise ValueError(f"loss.chest.hyphc_sign={self.hyphc_sign} must be 1 or -1")
        if self.hyphc_negatives not in HYPHC_NEGATIVES:
            raise ValueError(f"loss.chest.hyphc_negatives={self.hyphc_negatives!r}; choose one of {HYPHC_NEGATIVES}")
        if self.euclid_features not in EUCLID_FEATURES:
            raise ValueError(f"loss.chest.euclid_features={self.euclid_features!r}; choose one of {EUCLID_FEATURES}")
        if self.eta_e < 0 or self.eta_h < 0 or self.tau < 0 or (self.eta_e == 0 and self.eta_h == 0):
            raise ValueError("loss.chest.eta_e, eta_h, tau must be >= 0 and eta_e + eta_h > 0")
        if head == "softtriple" and self.eta_e == 0:
            raise ValueError("loss.name=softtriple uses the Euclidean fields: loss.chest.eta_e must be > 0")
        if head == "softtriple" and self.delta_e >= 2.0:  # CHEST's default 5 is a distance margin
            raise ValueError(
                f"loss.name=softtriple compares cosine similarities (in [-1, 1]): a margin loss.chest.delta_e="
                f"{self.delta_e:g} >= 2 puts every class above the true one; SoftTriple's constants are "
                f"{SOFTTRIPLE_CONSTANTS} (CHEST's defaults are distance units)"
            )


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    """The class-sharded margin head.

    `name` picks the head: "distarc" (HyperSpaceX), or its special cases "arcface" (lambda = mu = 0),
    "cosface" (additive cosine margin) and "softmax" (plain linear softmax). Symbols follow
    docs/losses.md section 1.
    """

    name: str = "distarc"
    # "paper" (Eq. 1, symmetric softmax) or "official" (CE(z_den) + lambda*delta_y - mu*cos(phi_y); the released
    # code itself has no cos(phi) term: official with phi_weight=0, and scale=2)
    form: str = "paper"
    scale: float = 1.0  # s
    margin: float = 0.5  # m, radians (additive angular) or cosine units (cosface)
    margin_warmup_steps: int = 0  # m grows linearly from 0 over this many optimizer steps
    radial_weight: float = 0.005  # lambda
    phi_weight: float = 1.0  # mu, switch (or weight) of the cos(phi) term
    radius_start: float = 10.0  # r_0
    radius_gap: float = 10.0  # g
    num_spheres: int = 10  # S; class j lives on sphere j mod S (C need not divide by S, as the official tiling needs:
    # spheres then hold floor or ceil of C / S classes, e.g. MS1MV2 85,742 over 10)
    theta_guard: bool = False  # ArcFace's fallback cos(theta) - m sin(m) when theta + m > pi
    init_seed: int = 1234  # rows are drawn from a generator keyed by (init_seed, global class id)
    sample_rate: float = 1.0  # Partial-FC: fraction of each rank's classes in the softmax (positives always)
    # > 0: the class softmax over this many local classes at a time, recomputed in backward
    # (model/chunked_softmax.py): the [G, C] logit blocks shrink to [G, chunk] for ~1/3 more head FLOPs;
    # 0: the whole shard at once (fastest while the table fits)
    class_chunk: int = 0
    chest: ChestConfig = dataclasses.field(default_factory=ChestConfig)

    def validate(self) -> None:
        if self.name not in HEAD_NAMES:
            raise ValueError(f"loss.name={self.name!r} is unknown; choose one of {HEAD_NAMES}")
        if self.form not in DISTARC_FORMS:
            raise ValueError(f"loss.form={self.form!r} is unknown; choose one of {DISTARC_FORMS}")
        if self.name in ("distarc", "arcface") and not 0.0 <= self.margin < math.pi / 2:
            raise ValueError(f"loss.margin={self.margin} must be in [0, pi/2) for an angular margin")
        if self.scale <= 0:
            raise ValueError(f"loss.scale={self.scale} must be > 0")
        if self.radial_weight < 0:
            raise ValueError(f"loss.radial_weight={self.radial_weight} must be >= 0")
        if self.num_spheres < 1:
            raise ValueError(f"loss.num_spheres={self.num_spheres} must be >= 1")
        if self.radius_start <= 0 or self.radius_gap < 0:
            raise ValueError("loss.radius_start must be > 0 and loss.radius_gap >= 0 (radii must be positive)")
        if self.margin_warmup_steps < 0:
            raise ValueError(f"loss.margin_warmup_steps={self.margin_warmup_steps} must be >= 0")
        if self.class_chunk < 0:
            raise ValueError(f"loss.class_chunk={self.class_chunk} must be >= 0 (0 = the whole shard at once)")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"loss.sample_rate={self.sample_rate} must be in (0, 1]")
        if self.name in ("chest", "softtriple"):
            self.chest.validate(self.name)


def has_shared_fc(cfg: LossConfig) -> bool:
    """CHEST maps Euclidean features into the ball through a shared FC h (replicated); SoftTriple has none."""
    return cfg.name == "chest"

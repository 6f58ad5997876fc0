"""Typed, validated configurations of the erasure methods, and the paper's presets.

Defaults of each config class are the reference code's defaults (``train_age.py`` / ``train-esd.py``);
presets are the paper's per-experiment recipes plus scaled recipes for the toy world. A run records
its preset and every field that differs from it (``deviations``) in its manifest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from ..checks import (check_choice, check_count, check_positive, check_range, check_template, check_text,
                      field_help, help_field, short)
from .params import PARAMETER_SETS

LOSS_SPACES = ("x0", "eps")
UCE_ALIGNMENTS = ("last_word", "all")
XT_SOURCES = ("sample", "pool")
PRECISIONS = ("fp32", "bf16")
TARGET_SEARCHES = ("gumbel", "damage", "damage_floor", "damage_net", "two_stage")
# damage_floor: the damage search with this near-copy floor unless near_copy_floor is set; the measured
# comparison of the searches is in docs/graph.md ("Target search")
DAMAGE_FLOOR = 0.5
# learned: the paper; the others are the ablations that separate the adaptive targets from the rest
PI_MODES = ("learned", "uniform", "nearest", "most_damaged")
# Bounds shared by the CLI, the app and the job store (docs/erasure.md, "Limits"): far above any
# recipe (the paper: 1000 steps, guidance 3, eta 1), low enough that a typo is refused, not run for years.
MAX_ITERATIONS = 100_000
MAX_DDIM_STEPS = 1000  # the schedule has 1000 training timesteps
MAX_GUIDANCE = 100.0  # classifier-free guidance scale and negative guidance (eta)
MAX_BATCH = 256
# How a fine-tuning run executes, not what it computes: a checkpoint resumes under other values of these
EXECUTION_FIELDS = ("compile_chain", "channels_last")


def _list(text: str):
    return field(default_factory=list, metadata={"help": text})


@dataclass
class MethodConfig:
    """Fields and checks every erasure method shares."""

    method: ClassVar[str] = ""

    concepts: list[str] = _list("concepts to erase (several are erased at once)")
    preset: str | None = help_field("name of the preset this config started from", None)
    prompt_template: str = help_field("prompt of a concept during training, {c} = concept", "{c}")
    seed: int = help_field("seed of every random draw of the run", 0)
    requires_gpu: bool = help_field("the recipe is sized for a GPU; refuse to start on CPU", False)
    deviations: list[str] = _list("how this config departs from the paper (recorded in the manifest)")

    def __post_init__(self):
        if isinstance(self.concepts, str):
            self.concepts = [self.concepts]
        self.concepts = [c.strip() for c in self.concepts]
        if not self.concepts or any(not c for c in self.concepts):
            raise ValueError("give at least one non-empty concept to erase")
        for concept in self.concepts:
            check_text("concept", concept)
        if len(set(c.lower() for c in self.concepts)) != len(self.concepts):
            raise ValueError(f"duplicate concepts in {self.concepts}")
        check_template("prompt_template", self.prompt_template, "{c}")

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return field_help(cls)


@dataclass
class EraseConfig(MethodConfig):
    """Fields every fine-tuning method (ESD, AGE) shares."""

    parameter_set: str = help_field("trainable UNet weights: " + ", ".join(PARAMETER_SETS), "xattn")
    iterations: int = help_field("model (theta) steps", 1000)
    lr: float = help_field("Adam learning rate of the model", 1e-5)
    batch_size: int = help_field("latents per step (the reference uses 1)", 1)
    negative_guidance: float = help_field("eta: how far the erased concept is pushed past the target", 1.0)
    start_guidance: float = help_field("CFG scale of the 'sample till t' latents", 3.0)
    ddim_steps: int = help_field("DDIM schedule of the 'sample till t' latents", 50)
    loss_space: str = help_field("x0 (AGE's paper) or eps; x0 weights steps by (1-a)/a", "x0")
    xt_source: str = help_field("sample: DDIM till t with the current model (paper); pool: frozen samples re-noised (fast)", "sample")
    pool_size: int = help_field("frozen samples per concept in pool mode", 16)
    precision: str = help_field("fp32, or bf16 autocast for the UNet passes", "fp32")
    checkpoint_every: int = help_field("write a resumable checkpoint every N model steps (0: only at the end or on stop)", 0)
    compile_chain: bool = help_field(
        "compile the 'sample till t' UNet calls with torch.compile (CUDA graphs on a GPU): the same recipe, equal "
        "to the eager calls within float rounding; the first steps pay the compilation (ESD, AGE, AP: CA has no "
        "such chain)", False)
    channels_last: bool = help_field(
        "keep the UNet in channels-last memory format (the layout GPUs' convolution kernels prefer): the same "
        "recipe, equal within float rounding", False)

    def __post_init__(self):
        super().__post_init__()
        if self.parameter_set not in PARAMETER_SETS:
            raise ValueError(f"unknown parameter set {self.parameter_set!r}; choose one of {', '.join(PARAMETER_SETS)}")
        for name, most in (("iterations", MAX_ITERATIONS), ("batch_size", MAX_BATCH), ("ddim_steps", MAX_DDIM_STEPS),
                           ("pool_size", MAX_BATCH)):
            check_count(name, getattr(self, name), 1, most)
        check_count("checkpoint_every", self.checkpoint_every, 0, MAX_ITERATIONS)
        check_positive("lr", self.lr)
        check_range("negative_guidance (eta)", self.negative_guidance, 0, MAX_GUIDANCE)
        check_range("start_guidance", self.start_guidance, 0, MAX_GUIDANCE)
        check_choice("loss_space", self.loss_space, LOSS_SPACES)
        check_choice("xt_source", self.xt_source, XT_SOURCES)
        check_choice("precision", self.precision, PRECISIONS)
        for name in EXECUTION_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


@dataclass
class ESDConfig(EraseConfig):
    """ESD (Gandikota et al., ICCV'23): map the concept to a fixed target with negative guidance."""

    method: ClassVar[str] = "esd"

    target: str = help_field("fixed target prompt ('' = the empty prompt, as ESD)", "")
    # ESD's own code (train-esd.py) matches noise predictions; AGE's paper writes its loss in x0 space
    loss_space: str = help_field("eps (ESD's code) or x0 (AGE's paper); x0 weights steps by (1-a)/a", "eps")
    preserve_weight: float = help_field("weight of preserving the empty prompt (train-naive.py uses 0.1; ESD 0)", 0.0)

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.preserve_weight) and self.preserve_weight >= 0):
            raise ValueError(f"preserve_weight must be >= 0, got {self.preserve_weight}")
        check_text("target", self.target)
        if self.target.strip().lower() in (c.lower() for c in self.concepts):
            raise ValueError(f"the target {short(self.target)} is the erased concept itself")


@dataclass
class AGEConfig(EraseConfig):
    """Adaptive Guided Erasure: min over the model, max over a Gumbel-softmax target mixture."""

    method: ClassVar[str] = "age"

    lam: float = help_field("lambda: weight of preserving the target", 1.0)
    pgd_num_steps: int = help_field("one model step every N loop iterations, the others are pi steps (2 = alternate)", 2)
    gumbel_lr: float = help_field("Adam learning rate of the mixture logits pi", 1e-3)
    gumbel_temp: float = help_field("Gumbel-softmax temperature tau", 2.0)
    gumbel_hard: bool = help_field("straight-through one-hot sample (True) or soft top-k mixture (False)", False)
    gumbel_topk: int = help_field("k of the soft top-k mixture (0: the whole softmax, as AP's code)", 5)
    k_closest: int = help_field("prefilter: keep the k candidates closest to the concept (L2 of prompt hidden states)", 1000)
    num_centers: int = help_field("1-D k-means on the distances picks this many candidates (skipped when k_closest <= it)", 100)
    vocab: str = help_field("candidate vocabulary: toy, imagenet, en3k, or a file with one candidate per line", "en3k")
    candidates: list[str] = _list("explicit candidate list (overrides vocab)")
    synonyms: list[str] = _list("candidates excluded as synonyms of an erased concept")
    target_search: str = help_field("gumbel: the paper's gradient search; damage: score every candidate's preservation "
                               "damage; damage_floor: the damage search without near copies (near_copy_floor "
                               f"{DAMAGE_FLOOR} unless set), the better search on the toy world; damage_net: damage net of "
                               "the erasure (the part of each candidate's change that goes with the erased "
                               "concept's own change is not counted); two_stage: damage picks a neighbourhood, "
                               "then the paper's search within it", "gumbel", choices=TARGET_SEARCHES)
    damage_samples: int = help_field("latents per damage measurement (damage search)", 2)
    pi_mode: str = help_field("learned: pi is searched by target_search (the paper); ablations: uniform (pi frozen at "
                         "1/n), nearest (one fixed target, the candidate closest in text embedding), most_damaged "
                         "(one fixed target, the candidate a short ESD-'' probe damages most)", "learned", choices=PI_MODES)
    damage_probe_steps: int = help_field("ESD-'' steps of the probe that measures damage for pi_mode=most_damaged "
                                    "(the weights are put back after it)", 20)
    near_copy_floor: float = help_field("drop candidates whose frozen output on the erased concept's latents is closer to "
                                   "the concept's own than this fraction of the median candidate's (0: keep all, "
                                   "the paper)", 0.0)
    pi_spread: float = help_field("damage searches: pi also ascends this weight times its entropy, with each step's "
                                  "damage scaled to a maximum of 1, so pi settles near softmax(damage / pi_spread) over "
                                  "several damaged candidates instead of one (0: off)", 0.0)
    neighbourhood_size: int = help_field("two_stage search: candidates the damage stage keeps for the paper's search", 5)
    damage_stage_fraction: float = help_field("two_stage search: share of the run spent in the damage stage", 0.25)
    erase_check_every: int = help_field("erasure-success constraint: every N model steps generate the erased concept and "
                                   "raise the erasure weight while G > erase_target_g (0: off, the paper)", 0)
    erase_target_g: float = help_field("erasure-success constraint: the G (share recognised) an erased concept must reach", 0.05)
    erase_check_images: int = help_field("erasure-success constraint: images per check", 8)
    erase_weight_growth: float = help_field("erasure-success constraint: factor on the erasure weight per failed check", 2.0)
    erase_weight_max: float = help_field("erasure-success constraint: the erasure weight's ceiling", 16.0)
    share_draws: bool = help_field("a pi step reuses the preceding model step's concept, Gumbel sample and latents "
                              "(half the sampling; the reference draws afresh every iteration)", False)
    batch_pi_chain: bool = help_field("a pi step's 'sample till t' chain runs in the batch of the model step before "
                                      "it, with the model before that step's update; the pi step keeps its own "
                                      "draws (the reference samples after the update, one chain after the other)",
                                      False)
    pi_l1: bool = help_field("let the erasure term's gradient reach pi (the reference code detaches it)", False)
    neighbour_groups: dict = help_field("concept -> candidates that are its real neighbours, to log the search's hit rate", None)
    anchor: str | None = help_field("None: the erased concept is mapped to the searched target mixture (AGE); a prompt: "
                                    "it is mapped to this fixed prompt and the search only picks the concept to "
                                    "preserve (AP, '' = the empty prompt)", None)

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lambda must be a finite number >= 0, got {self.lam}")
        check_positive("gumbel_lr", self.gumbel_lr)
        check_positive("gumbel_temp", self.gumbel_temp)
        for name in ("pgd_num_steps", "k_closest", "num_centers", "damage_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_count("gumbel_topk", self.gumbel_topk, 0, MAX_ITERATIONS)
        if self.anchor is not None:
            check_text("anchor", self.anchor)
            if self.anchor.strip().lower() in (c.lower() for c in self.concepts):
                raise ValueError(f"the anchor {short(self.anchor)} is the erased concept itself")
            if self.pi_l1:
                raise ValueError("pi_l1 needs the erasure term to depend on pi; with a fixed anchor it does not")
        check_choice("target_search", self.target_search, TARGET_SEARCHES)
        check_choice("pi_mode", self.pi_mode, PI_MODES)
        check_count("damage_probe_steps", self.damage_probe_steps, 1, MAX_ITERATIONS)
        check_count("neighbourhood_size", self.neighbourhood_size, 1, MAX_ITERATIONS)
        check_count("erase_check_every", self.erase_check_every, 0, MAX_ITERATIONS)
        check_count("erase_check_images", self.erase_check_images, 1, MAX_BATCH)
        check_range("near_copy_floor", self.near_copy_floor, 0, 1)
        check_range("pi_spread", self.pi_spread, 0, 10)
        if self.target_search == "damage_floor" and self.near_copy_floor == 0:
            self.near_copy_floor = DAMAGE_FLOOR  # recorded in the manifest's config as the floor it ran with
        check_range("damage_stage_fraction", self.damage_stage_fraction, 0, 1)
        check_range("erase_target_g", self.erase_target_g, 0, 1)
        check_range("erase_weight_growth", self.erase_weight_growth, 1, 100)
        check_range("erase_weight_max", self.erase_weight_max, 1, 1e6)
        if self.pi_mode != "learned" and self.target_search != "gumbel":
            raise ValueError(f"pi_mode={self.pi_mode!r} fixes pi, so it has no target search; "
                             f"leave target_search at 'gumbel', got {self.target_search!r}")
        if self.pgd_num_steps < 2:
            raise ValueError("pgd_num_steps must be >= 2 so that pi gets steps")
        if self.batch_pi_chain and self.share_draws:
            raise ValueError("batch_pi_chain and share_draws both give a pi step its latents; choose one")
        if self.batch_pi_chain and self.xt_source != "sample":
            raise ValueError(f"batch_pi_chain batches 'sample till t' chains; xt_source={self.xt_source!r} runs none")


@dataclass
class APConfig(AGEConfig):
    """AP, adversarial preservation (Bui et al., NeurIPS'24): ESD towards a fixed anchor, plus preserving the
    concept the current model damages most, found by AGE's Gumbel search (AGE's runner, ``anchor`` set)."""

    method: ClassVar[str] = "ap"

    # train_adversarial_gumbel.py's argparse defaults (its soft Gumbel-softmax is the whole softmax)
    anchor: str | None = help_field("the fixed prompt the erased concept is mapped to ('' = the empty prompt, as AP)", "")
    gumbel_topk: int = help_field("k of the soft top-k mixture (0: the whole softmax, as AP's code)", 0)


@dataclass
class UCEConfig(MethodConfig):
    """UCE (Gandikota et al., WACV'24): closed-form edit of cross-attention keys and values."""

    method: ClassVar[str] = "uce"
    parameter_set: ClassVar[str] = "xattn_kv"

    target: str = help_field("what the erased concepts are mapped to ('' = the empty prompt)", "")
    preserve: list[str] = _list("concepts whose keys and values are kept")
    erase_scale: float = help_field("weight of the erasure equations", 1.0)
    preserve_scale: float | None = help_field("weight of the preservation equations (None: max(0.1, 1/number of "
                                         "preserved prompts), as the reference)", None)
    lam: float = help_field("lambda: ridge weight that keeps the edit close to the original weights", 0.5)
    token_alignment: str = help_field("last_word: edit the erased prompt's positions from its last word to the end, "
                                 "aligned with the target's from its last word (reference); all: every position "
                                 "onto the same position of the target", "last_word")
    preserve_empty: bool = help_field("also preserve the empty prompt '' (the reference always does)", True)

    def __post_init__(self):
        super().__post_init__()
        for text in [self.target] + list(self.preserve):
            check_text("target or preserved concept", text)
        erased = {c.lower() for c in self.concepts}
        if any(p.lower() in erased for p in self.preserve):
            raise ValueError("a concept cannot be both erased and preserved")
        for name in ("erase_scale", "preserve_scale", "lam"):
            value = getattr(self, name)
            if value is None and name == "preserve_scale":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        check_choice("token_alignment", self.token_alignment, UCE_ALIGNMENTS)
        if self.lam == 0 and not self.preserved_prompts():
            raise ValueError("lam must be > 0 when nothing is preserved (the system would be singular)")

    def preserved_prompts(self) -> list[str]:
        """The preserved prompts: '' (unless preserve_empty is off), then each preserved concept in the template."""
        return ([""] if self.preserve_empty else []) + [self.prompt_template.format(c=p) for p in self.preserve]

    def effective_preserve_scale(self) -> float:
        if self.preserve_scale is not None:
            return float(self.preserve_scale)
        return max(0.1, 1 / max(1, len(self.preserved_prompts())))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "parameter_set": self.parameter_set}


MAX_EPOCHS = 100  # RECE's epochs (the reference: 1 to 3)


@dataclass
class RECEConfig(UCEConfig):
    """RECE (Gong et al., ECCV'24): UCE's edit, then epochs of deriving the embedding that still regenerates
    the concept's keys and values in the edited model (closed form) and erasing it as well."""

    method: ClassVar[str] = "rece"

    # the UCE stage: UCE's own defaults (the reference starts from a checkpoint of UCE's train_erase.py)
    erase_scale: float = help_field("UCE stage: weight of the erasure equations", 1.0)
    preserve_scale: float | None = help_field("UCE stage: weight of the preservation equations (None: max(0.1, "
                                              "1/number of preserved prompts), as UCE)", None)
    lam: float = help_field("UCE stage: lambda, the ridge weight that keeps the edit close to the weights", 0.5)
    # the epochs: train.py's argparse defaults (its nudity recipe)
    uce_first: bool = help_field("start with UCE's edit (the reference loads a UCE checkpoint); off: the epochs "
                                 "start from the base model (the reference's --target_ckpt '')", True)
    epochs: int = help_field("epochs: derive each concept's adversarial embedding from the edited keys and "
                             "values, then erase it (train.py: 3; README: 3 nudity, 2 unsafe, 1 art and objects)", 3)
    regular_scale: float = help_field("regulariser weight of the adversarial embedding, lambda ||e||^2 (close_regzero; "
                                      "train.py 0.1, train_object.py and art.sh 1e-3)", 0.1)
    adv_erase_scale: float = help_field("epochs: weight of the adversarial embeddings' erasure equations", 1.0)
    adv_preserve_scale: float = help_field("epochs: weight of the preservation equations (train.py: 0.1)", 0.1)
    adv_lam: float = help_field("epochs: lambda, the ridge weight of the adversarial edit (train.py: 0.1)", 0.1)
    adv_token_alignment: str = help_field("epochs: all: every position of the adversarial embedding onto the same "
                                          "position of the target (reference); last_word: only the positions from "
                                          "the erased prompt's last word on, aligned as UCE's last_word", "all")

    def __post_init__(self):
        super().__post_init__()
        check_count("epochs", self.epochs, 0, MAX_EPOCHS)
        if self.epochs == 0 and not self.uce_first:
            raise ValueError("epochs must be at least 1 with uce_first off (nothing would be edited)")
        check_positive("regular_scale", self.regular_scale)
        for name in ("adv_erase_scale", "adv_preserve_scale", "adv_lam"):
            check_range(name, getattr(self, name), 0, 1e6)
        check_choice("adv_token_alignment", self.adv_token_alignment, UCE_ALIGNMENTS)
        if self.adv_lam == 0 and not self.preserved_prompts():
            raise ValueError("adv_lam must be > 0 when nothing is preserved (the system would be singular)")


CA_LOSS_TYPES = ("model-based", "noise-based")
CA_ANCHOR_PREDICTIONS = ("current", "frozen")
CA_LOSS_SPACES = ("output", "eps", "x0")
MAX_ANCHOR_IMAGES = 10_000


@dataclass
class CAConfig(EraseConfig):
    """CA, Concept Ablation (Kumari et al., ICCV'23): the erased concept's prediction is matched to the anchor
    concept's on images of the anchor. Defaults: the reference's diffusers train.py (argparse defaults)."""

    method: ClassVar[str] = "ca"

    anchor: str = help_field("anchor concept the erased concepts are overwritten with (--class_prompt; '' = the "
                             "empty prompt, whatever the templates)", "")
    anchor_templates: list[str] = _list("anchor prompt templates with {c} (the reference's anchor captions): "
                                             "anchor image i is made from template i mod n with {c} = anchor and trained "
                                             "with {c} = the erased concept (empty: prompt_template)")
    anchor_images: int = help_field("anchor images the base model generates at the start (--num_class_images)", 1000)
    loss_type: str = help_field("model-based: match the anchor prompt's prediction (stop-gradient); noise-based: denoise "
                                "the anchor images under the erased prompt (--loss_type_reverse)", "model-based")
    anchor_prediction: str = help_field("model-based target from the current model under stop-gradient (the reference "
                                        "code) or from the frozen base model", "current")
    prior_preservation: bool = help_field("also train the ordinary diffusion loss on anchor images under their anchor "
                                          "prompts (--with_prior_preservation)", False)
    prior_loss_weight: float = help_field("weight of the prior loss (--prior_loss_weight; the CompVis code weighs it 0.2)", 1.0)
    detach_start_token: bool = help_field("no gradient through the start token's cross-attention keys and values (the "
                                          "reference's Custom Diffusion attention processor)", True)
    hflip: bool = help_field("flip each anchor image horizontally with probability 1/2 (--hflip)", False)
    weight_decay: float = help_field("AdamW weight decay (--adam_weight_decay)", 1e-2)
    max_grad_norm: float = help_field("clip the gradient norm to this (--max_grad_norm; 0: off)", 1.0)
    anchor_eta: float = help_field("DDIM eta of the anchor images (0: deterministic, as the reference's DPM-Solver)", 0.0)
    # EraseConfig's fields, with CA's meaning or the reference's defaults
    parameter_set: str = help_field("trainable UNet weights: xattn_kv (--parameter_group cross-attn, the reference's "
                                    "default), full (full-weight), or another set", "xattn_kv")
    iterations: int = help_field("steps (the reference: one epoch of 1000 images at batch 4 = 250)", 250)
    lr: float = help_field("AdamW learning rate, after the reference's --scale_lr (base lr x batch x GPUs)", 1e-5)
    batch_size: int = help_field("anchor images per step (--train_batch_size; prior rows come on top)", 4)
    ddim_steps: int = help_field("DDIM steps of the anchor images (the reference: 25 DPM-Solver++ steps)", 25)
    start_guidance: float = help_field("CFG scale of the anchor images (the reference: 6)", 6.0)
    loss_space: str = help_field("output: the model's own output (the reference; eps on SD-1.x, v on a v model); eps or "
                                 "x0: both sides converted", "output")
    negative_guidance: float = help_field("unused by CA", 1.0)
    xt_source: str = help_field("unused by CA (its latents are noised anchor images)", "sample")
    pool_size: int = help_field("unused by CA (see anchor_images)", 16)

    def __post_init__(self):
        check_choice("loss_space", self.loss_space, CA_LOSS_SPACES)
        space, self.loss_space = self.loss_space, "eps"  # EraseConfig knows x0 and eps; "output" is CA's own
        try:
            super().__post_init__()
        finally:
            self.loss_space = space
        check_text("anchor", self.anchor)
        self.anchor = self.anchor.strip()
        if self.anchor.lower() in (c.lower() for c in self.concepts):
            raise ValueError(f"the anchor {short(self.anchor)} is the erased concept itself")
        if isinstance(self.anchor_templates, str):
            self.anchor_templates = [self.anchor_templates]
        for template in self.anchor_templates:
            check_text("anchor template", template)
            check_template("anchor template", template, "{c}")
        check_count("anchor_images", self.anchor_images, 1, MAX_ANCHOR_IMAGES)
        check_choice("loss_type", self.loss_type, CA_LOSS_TYPES)
        check_choice("anchor_prediction", self.anchor_prediction, CA_ANCHOR_PREDICTIONS)
        check_range("prior_loss_weight", self.prior_loss_weight, 0, 1e6)
        check_range("weight_decay", self.weight_decay, 0, 1)
        check_range("max_grad_norm", self.max_grad_norm, 0, 1e6)
        check_range("anchor_eta", self.anchor_eta, 0, 1)

    def templates(self) -> list[str]:
        return list(self.anchor_templates) or [self.prompt_template]

    def anchor_prompts(self) -> list[str]:
        """One anchor prompt per template: the anchor in it, or '' for the empty anchor."""
        return ["" if not self.anchor else " ".join(t.format(c=self.anchor).split()) for t in self.templates()]


_TOY_DEVIATIONS = [
    "loss in eps space, the space the toy recipe was tuned in (x0 space weights steps by (1-a)/a, up to 212 at t=999)",
    "200 model steps at lr 3e-4, batch 4, instead of 1000 at 1e-5, batch 1: a 1.7 M-parameter model",
    "'sample till t' on a 10-step DDIM schedule instead of 50",
]

# The reference's EN3K (data/english_3000.csv of the AGE code) is published without a license, so the
# built-in en3k is another list (docs/erasure.md, "Choices where the reference code and the paper part ways").
EN3K_DEVIATION = ("vocabulary en3k: wordfreq's 3000 most frequent [a-z]+ English words, not the reference's "
                  "data/english_3000.csv (published without a license, not shipped): 1,948 of its 3,000 words "
                  "are shared, and 'naked', 'toy', 'breast' are missing; vocab=PATH/english_3000.csv reads "
                  "the reference's file as it is")

# name -> (method, field values, deviations from the paper)
PRESETS: dict[str, tuple[str, dict, list[str]]] = {
    "imagenette": ("age", dict(parameter_set="xattn", iterations=1000, lr=1e-5, gumbel_lr=1e-2, gumbel_temp=0.1,
                               gumbel_hard=True, gumbel_topk=2, k_closest=100, num_centers=100, vocab="imagenet",
                               lam=1.0, start_guidance=3.0, negative_guidance=1.0, loss_space="x0",
                               ddim_steps=50, requires_gpu=True), []),
    "nudity": ("age", dict(parameter_set="noxattn", iterations=1000, lr=1e-5, gumbel_lr=1e-2, gumbel_temp=2.0,
                           gumbel_hard=True, gumbel_topk=2, k_closest=100, num_centers=100, vocab="en3k",
                           lam=1.0, start_guidance=3.0, negative_guidance=1.0, loss_space="x0",
                           ddim_steps=50, requires_gpu=True), [EN3K_DEVIATION]),
    "artist": ("age", dict(parameter_set="xattn", iterations=1000, lr=1e-5, gumbel_lr=1e-3, gumbel_temp=2.0,
                           gumbel_hard=False, gumbel_topk=5, k_closest=1000, num_centers=100, vocab="en3k",
                           lam=1.0, start_guidance=3.0, negative_guidance=1.0, loss_space="x0",
                           ddim_steps=50, requires_gpu=True),
               ["vocabulary en3k: the paper's 'artistic' concept dictionary is not published", EN3K_DEVIATION]),
    "esd-x": ("esd", dict(parameter_set="xattn", iterations=1000, lr=1e-5, negative_guidance=1.0,
                          start_guidance=3.0, loss_space="eps", ddim_steps=50, requires_gpu=True), []),
    "esd-u": ("esd", dict(parameter_set="noxattn", iterations=1000, lr=1e-5, negative_guidance=1.0,
                          start_guidance=3.0, loss_space="eps", ddim_steps=50, requires_gpu=True), []),
    "toy": ("age", dict(parameter_set="xattn", iterations=200, lr=3e-4, batch_size=4, gumbel_lr=5e-2,
                        gumbel_temp=0.1, gumbel_hard=True, k_closest=100, num_centers=100, vocab="toy",
                        lam=1.0, start_guidance=3.0, negative_guidance=1.0, loss_space="eps",
                        prompt_template="a {c}", ddim_steps=10),
            _TOY_DEVIATIONS + ["pi lr 5e-2 instead of 1e-2: 5x fewer pi steps"]),
    # The faithful recipe's 200 + 200 steps, cheaper per step (docs/erasure.md, "Fast setting"):
    # batch 2, "sample till t" on 5 DDIM steps, and a pi step reuses its model step's draws.
    "toy-fast": ("age", dict(parameter_set="xattn", iterations=200, lr=3e-4, batch_size=2, gumbel_lr=5e-2,
                             gumbel_temp=0.1, gumbel_hard=True, k_closest=100, num_centers=100, vocab="toy",
                             lam=1.0, start_guidance=3.0, negative_guidance=1.0, loss_space="eps",
                             prompt_template="a {c}", ddim_steps=5, share_draws=True),
                 [_TOY_DEVIATIONS[0],
                  "200 model steps at lr 3e-4, batch 2, instead of 1000 at 1e-5, batch 1: a 1.7 M-parameter model",
                  "'sample till t' on a 5-step DDIM schedule instead of 50",
                  "each pi step reuses its model step's concept, Gumbel sample and latents (the paper samples "
                  "afresh every iteration)",
                  "pi lr 5e-2 instead of 1e-2: 5x fewer pi steps"]),
    "toy-esd": ("esd", dict(parameter_set="xattn", iterations=200, lr=3e-4, batch_size=4, negative_guidance=1.0,
                            start_guidance=3.0, loss_space="eps", prompt_template="a {c}", ddim_steps=10),
                _TOY_DEVIATIONS),
    # toy-esd made cheaper per step as toy-fast is for AGE (batch 2, 5-step "sample till t"), for graphs
    "toy-esd-fast": ("esd", dict(parameter_set="xattn", iterations=200, lr=3e-4, batch_size=2, negative_guidance=1.0,
                                 start_guidance=3.0, loss_space="eps", prompt_template="a {c}", ddim_steps=5),
                     [_TOY_DEVIATIONS[0],
                      "200 model steps at lr 3e-4, batch 2, instead of 1000 at 1e-5, batch 1: a 1.7 M-parameter model",
                      "'sample till t' on a 5-step DDIM schedule instead of 50"]),
    "toy-uce": ("uce", dict(prompt_template="a {c}"), []),
    # AP's run_imagenette.sh (xattn, lr 1e-5, Gumbel lr 1e-2, temperature 2, hard, 100 centres of the 1000 closest)
    "ap": ("ap", dict(parameter_set="xattn", iterations=1000, lr=1e-5, gumbel_lr=1e-2, gumbel_temp=2.0,
                      gumbel_hard=True, k_closest=1000, num_centers=100, vocab="en3k", lam=1.0, anchor="",
                      start_guidance=3.0, negative_guidance=1.0, loss_space="x0", ddim_steps=50, requires_gpu=True),
           [EN3K_DEVIATION]),
}

# SDXL versions of the paper's Stable Diffusion recipes (the SDXL backend's defaults): the same steps,
# learning rates and targets; the UNet passes in bf16 autocast.
_SDXL_DEVIATIONS = [
    "SDXL instead of SD-1.4: the paper's recipe is for SD-1.4; on SDXL it runs unchanged on both text "
    "encoders' states, the pooled embedding and size ids at the native 1024 px (128x128 latents)",
    "bf16 autocast for the UNet passes instead of fp32: SDXL's UNet has about 2.6 B parameters (SD-1.4: "
    "0.86 B) and 4x the latent area, so a UNet pass costs roughly 3 x 4 = 12 times as much (an estimate from the sizes; "
    "not measured on a GPU)",
]
# AP on the toy world: toy-fast with a fixed empty anchor, so that AP and AGE differ only in the erasure's target
PRESETS["toy-ap"] = ("ap", {**PRESETS["toy-fast"][1], "anchor": ""}, PRESETS["toy-fast"][2])
for _name in ("imagenette", "nudity", "artist", "esd-x", "ap"):
    _method, _values, _deviations = PRESETS[_name]
    PRESETS[f"sdxl-{_name}"] = (_method, {**_values, "precision": "bf16"}, _deviations + _SDXL_DEVIATIONS)

# RECE: train.py's recipe (its nudity script: 3 epochs, regulariser 0.1, lamb 0.1, preserve 0.1) after UCE's
# defaults; closed form, so no GPU is needed. Artists and difficult objects: epochs=1, regular_scale=1e-3.
_RECE = dict(uce_first=True, epochs=3, regular_scale=0.1, adv_erase_scale=1.0, adv_preserve_scale=0.1, adv_lam=0.1,
             adv_token_alignment="all", lam=0.5, erase_scale=1.0, preserve_scale=None, token_alignment="last_word")
# the toy world's concepts are objects: the README's recipe for objects UCE does not fully erase (1 epoch,
# regulariser 0.1); train.py's 3 epochs take the unrelated concepts' accuracy to 0.52 (docs/erasure.md, "RECE")
PRESETS["toy-rece"] = ("rece", {**_RECE, "epochs": 1, "prompt_template": "a {c}"}, [])
PRESETS["rece"] = ("rece", dict(_RECE), [])
PRESETS["sdxl-rece"] = ("rece", dict(_RECE), [
    "SDXL instead of SD-1.4: the recipe runs unchanged on both text encoders' token states side by side "
    "(2048 wide); the adversarial embedding is derived for those token states only, not the pooled embedding"])

# CA: the reference's diffusers recipe for objects and styles (its README): --learning_rate 2e-6 --scale_lr
# --train_batch_size 4 on 2 GPUs (2e-6 x 4 x 2 = 1.6e-5 for 8 images a step), 100 steps, cross-attention k/v, --hflip
_CA = dict(parameter_set="xattn_kv", iterations=100, lr=1.6e-5, batch_size=8, anchor_images=1000, ddim_steps=25,
           start_guidance=6.0, anchor_eta=0.0, hflip=True, requires_gpu=True)
_CA_DEVIATIONS = [
    "anchor images from the project's DDIM sampler (25 steps, CFG 6, eta 0) instead of DPM-Solver++ (25 steps, CFG 6), "
    "kept as latents: decoded and re-encoded with the VAE's mean, without JPEG files or latent_dist.sample()",
    "anchor prompts from anchor_templates (default: the prompt template) instead of 200 retrieved or LLM-written "
    "captions of the anchor; the anchor ('' unless set) is the paper's per-concept choice (e.g. 'cat' for 'grumpy cat')",
    "no resize augmentation (as --noaug; the object recipe's rescaled images with 'far away'/'zoomed in' captions "
    "and a masked loss are not implemented); the flips flip the decoded image, then re-encode it",
    "one device with 8 images a step instead of 2 GPUs with 4 each (the same batch and learning rate)",
]
PRESETS["ca"] = ("ca", dict(_CA), _CA_DEVIATIONS)
PRESETS["sdxl-ca"] = ("ca", {**_CA, "precision": "bf16"}, _CA_DEVIATIONS + _SDXL_DEVIATIONS)
# CA on the toy world: the empty anchor for every concept; the toy model's sampler (10 DDIM steps, CFG 3, eta 1)
PRESETS["toy-ca"] = ("ca", dict(anchor="", parameter_set="xattn_kv", iterations=100, lr=3e-4, batch_size=4, anchor_images=32,
                                ddim_steps=10, start_guidance=3.0, anchor_eta=1.0, prompt_template="a {c}"),
                     ["100 steps at lr 3e-4, batch 4, instead of 100 at 1.6e-5, batch 8: a 1.7 M-parameter model",
                      "32 anchor images instead of 1000, sampled as the toy model samples (10 DDIM steps, CFG 3, eta 1)",
                      "the empty prompt as the anchor of every concept (the paper picks an anchor per concept)"])


def make_config(method: str, preset: str | None = None, **overrides):
    """A validated config: the preset's values, then ``overrides``; each override of a preset value
    is recorded as a deviation."""
    from .registry import get_method

    cls = get_method(method).config
    values: dict = {}
    deviations: list[str] = []
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        preset_method, preset_values, preset_deviations = PRESETS[preset]
        if preset_method != method:
            raise ValueError(f"preset {preset!r} is for method {preset_method!r}, not {method!r}")
        values.update(preset_values)
        deviations += preset_deviations
    known = {f.name for f in fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown {method} option(s): {', '.join(sorted(unknown))}")
    for key, value in overrides.items():
        if preset is not None and key in values and values[key] != value:
            deviations.append(f"{key}={value!r} instead of the preset's {values[key]!r}")
        values[key] = value
    values["preset"] = preset
    values["deviations"] = deviations + list(values.get("deviations", []))
    return cls(**values)


def presets_for(method: str) -> list[str]:
    """The presets of one method, in definition order."""
    return [name for name, (m, _, _) in PRESETS.items() if m == method]


# ---- MACE (Lu et al., CVPR'24): core/erasure/mace.py; docs/erasure.md, "MACE" ----------------------------
@dataclass
class MACECFRConfig(MethodConfig):
    """MACE's closed-form stages only: the cross-attention refinement (CFR) of keys and values, then the
    fusion with no LoRA (it keeps the refined weights unless fuse_preserve_scale > 0)."""

    method: ClassVar[str] = "mace-cfr"
    parameter_set: ClassVar[str] = "xattn_kv"

    target: str = help_field("the mapping concept: each prompt's words around the erased concept are refined towards "
                             "the same prompt with this in its place (the reference's mapping_concept, e.g. 'ground' "
                             "for a ship; '' = the prompt without the concept)", "")
    templates: list[str] = _list("prompts of each concept, {c} = concept (the reference's 30 augmentation templates "
                                 "are not shipped: empty = prompt_template alone)")
    preserve: list[str] = _list("prompts whose keys and values are kept at every position, as written (the reference's "
                                "cache of COCO captions), weighted by train_preserve_scale and fuse_preserve_scale")
    lam: float = help_field("lambda: ridge weight that keeps the refined and fused weights close to the current ones "
                            "(configs/object/erase_ship.yaml: 1e3)", 1e3)
    train_preserve_scale: float = help_field("weight of the preserved prompts in the refinement (enters squared, as "
                                             "in the reference's code path)", 0.0)
    fuse_preserve_scale: float = help_field("weight of the preserved prompts in the fusion", 0.0)

    def __post_init__(self):
        super().__post_init__()
        check_text("target (mapping concept)", self.target)
        for template in self.templates:
            check_text("template", template)
            check_template("each template", template, "{c}")
        for text in self.preserve:
            check_text("preserved prompt", text)
        erased = {c.lower() for c in self.concepts}
        if self.target.strip().lower() in erased:
            raise ValueError("the mapping concept (target) cannot be one of the erased concepts")
        for name in ("lam", "train_preserve_scale", "fuse_preserve_scale"):
            check_range(name, getattr(self, name), 0, 1e12)

    def prompts(self, concept: str) -> list[str]:
        """The prompts of ``concept``: each template (or the prompt template) with it in place of {c}."""
        return [t.format(c=concept) for t in (self.templates or [self.prompt_template])]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "parameter_set": self.parameter_set}


@dataclass
class MACEConfig(MACECFRConfig):
    """MACE, all three stages: CFR, one LoRA per concept trained to remove the concept tokens' attention
    inside the object's mask, and the closed-form fusion of the LoRAs into the keys and values."""

    method: ClassVar[str] = "mace"

    iterations: int = help_field("LoRA steps per concept (max_train_steps)", 50)
    lr: float = help_field("AdamW learning rate of the LoRAs", 1e-5)
    rank: int = help_field("rank of each to_k / to_v LoRA", 1)
    num_images: int = help_field("images (with masks) of each concept that its LoRA trains on", 8)
    use_masks: bool = help_field("restrict the attention loss to the object's pixels (the reference's use_gsam_mask; "
                                 "masks come from the model's backend, or a Grounded-SAM in the local Hub cache)", True)
    use_pooler: bool = help_field("also drive down the attention of the end-of-text token positions (with CLIP's "
                                  "SD-1.x tokenizer the padding too, as its pad is the same token)", True)
    pooler_padding: bool = help_field("with use_pooler, also the padding of a tokenizer that pads with another token "
                                      "than end-of-text (the toy's, SD-2's): what use_pooler covers on SD-1.x", False)
    importance_sampling: bool = help_field("draw timesteps from the reference's window around t=200..400 instead of "
                                           "uniformly", True)
    imagenet_normalise: bool = help_field("encode the training images ImageNet-normalised, as the reference's dataset "
                                          "does (off: as the model's codec expects them)", True)
    weight_decay: float = help_field("AdamW weight decay", 1e-2)
    max_grad_norm: float = help_field("clip the LoRA gradients to this norm", 1.0)

    def __post_init__(self):
        super().__post_init__()
        check_count("iterations", self.iterations, 1, MAX_ITERATIONS)
        check_count("rank", self.rank, 1, 1024)
        check_count("num_images", self.num_images, 1, MAX_BATCH)
        check_positive("lr", self.lr)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_range("weight_decay", self.weight_decay, 0, 1)


_MACE_SD = dict(target="ground", lam=1e3, prompt_template="A photo of {c}")
_MACE_TEMPLATES = ("the reference's 30 prompt-augmentation templates (src/cfr_utils.py, under a non-commercial "
                   "licence) are not shipped: one prompt, 'A photo of {c}', unless templates=[...] is given")
_MACE_TOY = dict(target="", prompt_template="a {c}", templates=["a {c}", "a photo of a {c}", "{c}", "an image of a {c}"])
_MACE_TOY_LAMBDA = ("lambda 1 instead of 1e3: lambda weighs against the sums of c c^T, far smaller for the toy "
                    "text encoder (64 dimensions, 10 positions, token norms 5-7.5) than for CLIP's; at 1e3 the toy "
                    "edit leaves the erased concept recognised in every image")
_MACE_TOY_DEVIATIONS = [
    "the toy world's own four training templates instead of the reference's 30 augmentation templates",
    "mapping concept '' (the toy world has no background word; the reference maps a ship to 'ground')",
]
PRESETS.update({
    "toy-mace": ("mace", dict(_MACE_TOY, lam=1.0, iterations=50, lr=2e-3, imagenet_normalise=False),
                 _MACE_TOY_DEVIATIONS + [_MACE_TOY_LAMBDA,
                     "LoRA lr 2e-3 instead of 1e-5 (50 steps, rank 1, as the reference): at 1e-5 the toy LoRAs do "
                     "not move; at 1e-2 they take related concepts along (docs/erasure.md, MACE)",
                     "masks from the toy renderer (exact coverage) instead of Grounded-SAM on generated images",
                     "images encoded as the toy codec expects them, not ImageNet-normalised"]),
    "toy-mace-cfr": ("mace-cfr", dict(_MACE_TOY, lam=1.0), _MACE_TOY_DEVIATIONS + [_MACE_TOY_LAMBDA]),
    # configs/object/erase_ship.yaml
    "mace": ("mace", dict(_MACE_SD, iterations=50, lr=1e-5, rank=1, requires_gpu=True), [_MACE_TEMPLATES]),
    "mace-cfr": ("mace-cfr", dict(_MACE_SD), [_MACE_TEMPLATES]),
})
for _name in ("mace", "mace-cfr"):
    _method, _values, _deviations = PRESETS[_name]
    PRESETS[f"sdxl-{_name}"] = (_method, dict(_values), _deviations + _SDXL_DEVIATIONS[:1])

"""MACE (Lu et al., CVPR'24): mass concept erasure in three stages, on the cross-attention keys and values.

For every ``attn2.to_k`` / ``attn2.to_v`` weight W (out x text_dim), with token states c (the states the
cross-attention reads; both SDXL encoders' side by side):

1. **Closed-form refinement (CFR)** of the words *around* each erased concept. Each prompt of a concept
   (``templates``, else ``prompt_template``) is paired with the same prompt with the mapping concept
   (``target``) in its place; the tokens the two share before and after the concept (the start token,
   "a photo of", the end token) and the padding after them are paired one to one, and the erased
   prompt's states there, c_o, are mapped onto the original keys/values of the mapped prompt's, W c_n::

       W1 = (lam W + sum W c_n c_o^T + s^2 sum W c_p c_p^T) (lam I + sum c_o c_o^T + s^2 sum c_p c_p^T)^-1

   The concept's own tokens are not in the sums: what CFR removes is the concept's residue in the other
   words (CLIP's causal attention writes it into every later token). c_p: the ``preserve`` prompts, every
   position, s = ``train_preserve_scale`` (squared: the reference adds it to its cache and scales the cache
   by it again).
2. **One LoRA per concept** (rank ``rank``) on every to_k / to_v, on top of W1, trained for ``iterations``
   AdamW steps to drive down the attention that the concept's tokens (and the end-of-text positions,
   ``use_pooler``) receive inside the object's pixels: the loss is the sum over cross-attention layers of
   the Frobenius norm of the attention probabilities (all heads) at the masked pixels and those tokens,
   on a noised latent of an image of the concept (``num_images`` of them; timesteps drawn from the
   reference's window around t=200..400 with ``importance_sampling``). Images and masks come from the
   backend (the toy world renders them with each object's exact pixels); otherwise images the model
   generates are segmented by a Grounded-SAM from the local Hub cache (``core/segmenter.py``), and
   without one the stage is refused with one line saying what to download.
3. **Closed-form fusion** of the LoRAs: with W_i = W1 + B_i A_i and every position of concept i's prompts::

       W2 = (lam W1 + sum_i sum W_i c c^T + f sum W c_p c_p^T) (lam I + sum_i sum c c^T + f sum c_p c_p^T)^-1

   f = ``fuse_preserve_scale``. Solved in float64 (the reference: float32 ``torch.inverse``).

``mace-cfr`` runs stage 1 and the fusion of no LoRA (every W_i = W1), which keeps W1 unless f > 0.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .config import MACECFRConfig, MACEConfig
from .registry import MethodResult

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- tokens ------------------------------------------------------------------------------------------
def token_ids(bundle, prompt: str) -> list[int]:
    return list(bundle.tokenizer(prompt, truncation=True, max_length=bundle.max_tokens).input_ids)


def matched_positions(old: list[int], new: list[int], length: int) -> tuple[list[int], list[int]]:
    """The positions two token sequences share around the part where they differ, paired one to one: the
    common prefix, the common suffix, then each sequence's positions after its last token up to ``length``
    (cut where the one that ends later runs out)."""
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= start and end_new >= start and old[end_old] == new[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    at_old = list(range(start)) + list(range(end_old + 1, len(old)))
    at_new = list(range(start)) + list(range(end_new + 1, len(new)))
    last_old, last_new = (at_old[-1] if at_old else -1), (at_new[-1] if at_new else -1)
    count = max(0, length - 1 - max(last_old, last_new))
    return (at_old + list(range(last_old + 1, last_old + 1 + count)),
            at_new + list(range(last_new + 1, last_new + 1 + count)))


def concept_positions(bundle, prompt: str, concept: str, use_pooler: bool, padding: bool = False) -> torch.Tensor:
    """(tokens,) bool: where the concept's tokens stand in the padded prompt, and with ``use_pooler`` every
    position holding the end-of-text token (CLIP's SD-1.x tokenizer pads with it, so the padding too);
    with ``padding`` also every padding position of a tokenizer that pads with another token."""
    tokenizer = bundle.tokenizer
    ids = list(tokenizer(prompt, truncation=True, padding="max_length", max_length=bundle.max_tokens).input_ids)
    unpadded = len(tokenizer(prompt, truncation=True, max_length=bundle.max_tokens).input_ids)
    word = list(tokenizer(concept, add_special_tokens=False).input_ids)
    eos = tokenizer.eos_token_id
    marked = [False] * len(ids)
    for i, tok in enumerate(ids):
        if word and tok == word[0] and ids[i:i + len(word)] == word:
            marked[i:i + len(word)] = [True] * len(word)
        if use_pooler and (tok == eos or (padding and i >= unpadded)):
            marked[i] = True
    return torch.tensor(marked)


# ---- the closed forms --------------------------------------------------------------------------------
def projection_names(unet) -> list[str]:
    """The cross-attention key and value weights, in diffusers naming."""
    return [n for n, _ in unet.named_parameters()
            if ("attn2.to_k." in n or "attn2.to_v." in n) and n.endswith(".weight")]


def _states(bundle, prompts: list[str]) -> torch.Tensor:
    return bundle.cross_attention_states(bundle.encode(prompts)).double()


@torch.no_grad()
def refinement_sums(bundle, erased: list[str], mapped: list[str]) -> dict[str, torch.Tensor]:
    """CFR's sums over the erased prompts' shared positions: ``cc`` = sum c_o c_o^T, ``nc`` = sum c_n c_o^T
    and ``c`` = sum c_o (for a projection's bias)."""
    old, new = _states(bundle, erased), _states(bundle, mapped)
    length = old.shape[1]
    c_o, c_n = [], []
    for k, (a, b) in enumerate(zip(erased, mapped)):
        at_old, at_new = matched_positions(token_ids(bundle, a), token_ids(bundle, b), length)
        c_o.append(old[k, at_old])
        c_n.append(new[k, at_new])
    c_o, c_n = torch.cat(c_o), torch.cat(c_n)
    return {"cc": c_o.T @ c_o, "nc": c_n.T @ c_o, "c": c_o.sum(0)}


@torch.no_grad()
def all_position_sums(bundle, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Sums over every position of ``prompts``: ``cc`` = sum c c^T and ``c`` = sum c."""
    states = _states(bundle, prompts)
    states = states.reshape(-1, states.shape[-1])
    return {"cc": states.T @ states, "c": states.sum(0)}


def _values_times_contexts(w: torch.Tensor, b: torch.Tensor | None, source_context: torch.Tensor,
                           context_sum: torch.Tensor) -> torch.Tensor:
    """sum (W c' + b) c^T = W (sum c' c^T) + b (sum c)^T."""
    out = w @ source_context
    return out if b is None else out + torch.outer(b, context_sum)


SINGULAR = "the closed form is singular: raise lam above 0 or give more prompts (templates, preserve)"


def check_conditioned(gram: torch.Tensor) -> None:
    """One line when a gram matrix is singular in float64 (lam = 0 and fewer independent token states than
    dimensions; a random text encoder's states without a final layer-norm bias span one dimension less)."""
    values = torch.linalg.eigvalsh(gram)
    if not bool(values[0] > values[-1] * 1e-13):
        raise ValueError(SINGULAR)


def solve(numerator: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """numerator @ gram^-1 for a symmetric gram matrix, in float64."""
    solution, info = torch.linalg.solve_ex(gram, numerator.T)
    if int(info) != 0 or not torch.isfinite(solution).all():
        raise ValueError(SINGULAR)
    return solution.T


@torch.no_grad()
def refine(bundle, config: MACECFRConfig, weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor | None],
           preserved: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Stage 1 (CFR): the refined weights (float64), from the original ``weights``."""
    erased, mapped = [], []
    for concept in config.concepts:
        erased += config.prompts(concept)
        mapped += config.prompts(config.target)
    sums = refinement_sums(bundle, erased, mapped)
    d = sums["cc"].shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=sums["cc"].device)
    gram = config.lam * eye + sums["cc"]
    scale = config.train_preserve_scale ** 2
    if preserved is not None and scale > 0:
        gram = gram + scale * preserved["cc"]
    check_conditioned(gram)
    refined = {}
    for name, w in weights.items():
        b = biases[name]
        numerator = config.lam * w + _values_times_contexts(w, b, sums["nc"], sums["c"])
        if preserved is not None and scale > 0:
            numerator = numerator + scale * _values_times_contexts(w, b, preserved["cc"], preserved["c"])
        refined[name] = solve(numerator, gram)
    return refined


@torch.no_grad()
def fuse(bundle, config: MACECFRConfig, refined: dict[str, torch.Tensor], loras: dict[str, dict[str, torch.Tensor]],
         originals: dict[str, torch.Tensor], biases: dict[str, torch.Tensor | None],
         preserved: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Stage 3: the fused weights (float64). ``loras``: concept -> {weight name: B A} (absent: no LoRA)."""
    per_concept = {c: all_position_sums(bundle, config.prompts(c)) for c in config.concepts}
    d = next(iter(per_concept.values()))["cc"].shape[0]
    gram = config.lam * torch.eye(d, dtype=torch.float64, device=next(iter(per_concept.values()))["cc"].device)
    for sums in per_concept.values():
        gram = gram + sums["cc"]
    scale = config.fuse_preserve_scale
    if preserved is not None and scale > 0:
        gram = gram + scale * preserved["cc"]
    check_conditioned(gram)
    fused = {}
    for name, w1 in refined.items():
        b = biases[name]
        numerator = config.lam * w1
        for concept, sums in per_concept.items():
            delta = loras.get(concept, {}).get(name)
            w_i = w1 if delta is None else w1 + delta.double()
            numerator = numerator + _values_times_contexts(w_i, b, sums["cc"], sums["c"])
        if preserved is not None and scale > 0:
            numerator = numerator + scale * _values_times_contexts(originals[name], b, preserved["cc"], preserved["c"])
        fused[name] = solve(numerator, gram)
    return fused


# ---- stage 2: the attention-map loss -------------------------------------------------------------------
class AttentionProbe:
    """Sums, over the cross-attention layers of a UNet pass, the Frobenius norm of the attention
    probabilities at the masked pixels and the marked tokens (diffusers' own attention maths: the layers
    run ``AttnProcessor``, which computes the probabilities with ``Attention.get_attention_scores``)."""

    def __init__(self, unet, latent_size: tuple[int, int]):
        from diffusers.models.attention_processor import Attention

        self.layers = {n: m for n, m in unet.named_modules() if n.endswith("attn2") and isinstance(m, Attention)}
        if not self.layers:
            raise ValueError("the UNet has no cross-attention layer (attn2) for MACE's attention loss")
        self.latent_size = latent_size
        self.terms: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    def _grid(self, pixels: int) -> tuple[int, int]:
        h, w = self.latent_size
        scale = math.sqrt(h * w / pixels)
        return round(h / scale), round(w / scale)

    def _record(self, module, query, key, attention_mask=None):
        from diffusers.models.attention_processor import Attention

        probs = Attention.get_attention_scores(module, query, key, attention_mask)
        heads = module.heads
        probs_first = probs[:heads]  # the first (and only) latent of the batch, all heads
        selected = probs_first[:, :, self.positions]
        if self.mask is not None:
            grid = self._grid(probs.shape[1])
            keep = (F.interpolate(self.mask, size=grid, mode="nearest") > 0.5).reshape(-1)
            selected = selected[:, keep]
        self.terms.append(torch.linalg.vector_norm(selected, dtype=torch.promote_types(selected.dtype, torch.float32)))
        return probs

    @contextlib.contextmanager
    def recording(self, mask: torch.Tensor | None, positions: torch.Tensor):
        """Within: every UNet pass adds its layers' terms; ``mask`` (1, 1, H, W) in [0, 1] or None (all pixels)."""
        from diffusers.models.attention_processor import AttnProcessor

        self.mask, self.positions, self.terms = mask, positions, []
        before = {n: m.processor for n, m in self.layers.items()}
        try:
            for module in self.layers.values():
                module.set_processor(AttnProcessor())
                module.get_attention_scores = (lambda q, k, m=None, _module=module: self._record(_module, q, k, m))
            yield self
        finally:
            for name, module in self.layers.items():
                del module.get_attention_scores
                module.set_processor(before[name])

    def loss(self) -> torch.Tensor:
        return torch.stack(self.terms).sum()


def lora_weights(base: dict[str, torch.Tensor],
                 lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """W + B A for every weight with a LoRA (B: out x rank, A: rank x in), in the weights' dtype."""
    return {n: base[n] + (up @ down).to(base[n].dtype) for n, (up, down) in lora.items()}


def attention_loss(bundle, probe: AttentionProbe, weights: dict[str, torch.Tensor], noisy: torch.Tensor,
                   t: torch.Tensor, states: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """MACE's loss of one UNet pass with ``weights`` in place of the UNet's own (gradients reach them)."""
    with probe.recording(mask, positions):
        functional_call(bundle.unet, weights, (noisy, t), bundle.unet_kwargs(states))
    return probe.loss()


def importance_weights(num_timesteps: int, temperature: float = 0.05) -> torch.Tensor:
    """The reference's relation-focal importance sampling f(t): a soft window over t = 200..400."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    return torch.sigmoid(temperature * (t - 200)) - torch.sigmoid(temperature * (t - 400))


def masks_required_message(reason: str) -> str:
    return f"MACE's LoRA stage needs object masks: {reason}; or erase with --method mace-cfr (stage 1 only)"


def training_images(bundle, config: MACEConfig, concept: str,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(images (N, 3, H, W) in [0, 1], masks (N, 1, H, W) or None, where they came from) of one concept,
    made with the model as it is (before any stage edits it)."""
    n = config.num_images
    if not config.use_masks:
        from ..sampling import generate

        images = generate(bundle, config.prompt_template.format(c=concept), list(range(seed, seed + n)))
        return images, None, "generated"
    own = bundle.backend.concept_images_with_masks(bundle, concept, n, seed)
    if own is not None:
        images, masks = own
        return images, masks, f"{bundle.kind} backend"
    from ..segmenter import SegmenterUnavailableError, generated_images_with_masks

    try:
        images, masks, source = generated_images_with_masks(bundle, concept, n, seed)
    except SegmenterUnavailableError as err:
        raise RuntimeError(masks_required_message(str(err))) from None
    return images, masks, source


@torch.no_grad()
def training_latents(bundle, config: MACEConfig, images: torch.Tensor) -> torch.Tensor:
    if config.imagenet_normalise:
        # the reference feeds the VAE (x - mean) / std where the codec expects 2x - 1
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        images = ((images - mean) / std + 1) / 2
    return torch.cat([bundle.encode_images(images[i:i + 4]) for i in range(0, len(images), 4)])


def train_lora(bundle, config: MACEConfig, concept: str, latents: torch.Tensor, masks: torch.Tensor | None,
               base: dict[str, torch.Tensor], generator: torch.Generator, report,
               stop) -> tuple[dict, list[float], bool]:
    """Stage 2 for one concept: LoRA deltas {weight name: B A} on top of ``base`` (the bundle holds ``base``),
    the loss of every step, and whether it was stopped."""
    device = bundle.device
    params = dict(bundle.unet.named_parameters())
    lora = {}
    for name in base:
        out_dim, in_dim = params[name].shape
        down = (torch.randn(config.rank, in_dim, generator=generator) / config.rank).to(device).requires_grad_(True)
        up = torch.zeros(out_dim, config.rank, device=device, requires_grad=True)
        lora[name] = (up, down)
    trainable = [p for pair in lora.values() for p in pair]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                                  eps=1e-8)
    scheduler = bundle.train_scheduler()
    num_timesteps = scheduler.config.num_train_timesteps
    weights = (importance_weights(num_timesteps) if config.importance_sampling
               else torch.ones(num_timesteps, dtype=torch.float64))
    prompts = config.prompts(concept)
    states = bundle.encode(prompts)
    positions = [concept_positions(bundle, p, concept, config.use_pooler, config.pooler_padding).to(device)
                 for p in prompts]
    probe = AttentionProbe(bundle.unet, tuple(latents.shape[-2:]))
    for p in bundle.unet.parameters():
        p.requires_grad_(False)
    losses: list[float] = []
    order: list[int] = []
    for step in range(config.iterations):
        if stop():
            return {}, losses, True
        if not order:  # one epoch: every image once, shuffled
            order = torch.randperm(len(latents), generator=generator).tolist()
        i = order.pop(0)
        k = int(torch.randint(len(prompts), (1,), generator=generator))
        t = torch.multinomial(weights, 1, generator=generator).to(device)
        noise = torch.randn(latents[i:i + 1].shape, generator=generator).to(device, latents.dtype)
        noisy = scheduler.add_noise(latents[i:i + 1], noise, t)
        loss = attention_loss(bundle, probe, lora_weights(base, lora), noisy, t, states[k:k + 1], positions[k],
                              None if masks is None else masks[i:i + 1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"MACE's attention loss diverged at step {step + 1} of {concept!r}; lower lr")
        report(concept, losses[-1])
    with torch.no_grad():
        return {n: (up @ down).detach() for n, (up, down) in lora.items()}, losses, False


# ---- the runner ----------------------------------------------------------------------------------------
def run_mace(bundle, config: MACECFRConfig, run_dir, callbacks=None, stop=None, resume=False) -> MethodResult:
    """All three stages (``mace``), or the closed-form ones (``mace-cfr``); the bundle's weights are restored
    after. Not checkpointable: a stopped run keeps no weights, and resuming it starts again."""
    from .loop import StepReport, _history_row

    if config.requires_gpu and bundle.device.type != "cuda":
        raise RuntimeError(f"preset {config.preset!r} is the reference's GPU recipe and the model is on "
                           f"{bundle.device}; run it on a CUDA GPU, or pick a CPU-sized preset (e.g. "
                           f"'toy-{config.method}') or set requires_gpu=False")
    stop = stop or (lambda: False)
    callbacks = list(callbacks or [])
    with_lora = isinstance(config, MACEConfig)
    generator = torch.Generator().manual_seed(config.seed)
    # the LoRA stage's images (and masks) come from the model as it is, before any edit: refused first
    data = {}
    if with_lora:
        for k, concept in enumerate(config.concepts):
            images, masks, source = training_images(bundle, config, concept, config.seed + k)
            data[concept] = (training_latents(bundle, config, images.to(bundle.device)),
                             None if masks is None else masks.to(bundle.device, torch.float32), source)
    params = dict(bundle.unet.named_parameters())
    names = projection_names(bundle.unet)
    originals = {n: params[n].detach().clone() for n in names}
    biases = {n: (params[n[:-len("weight")] + "bias"].detach().double() if n[:-len("weight")] + "bias" in params
                  else None) for n in names}
    history: list[dict] = []
    total = config.iterations * len(config.concepts) if with_lora else 1
    started = time.time()
    state = {"step": 0}

    def report(concept: str, loss: float) -> None:
        state["step"] += 1
        elapsed = time.time() - started
        step_report = StepReport(step=state["step"], total=total, phase="theta", concept=concept,
                                 losses={"attention": loss}, elapsed=elapsed,
                                 eta=elapsed / state["step"] * (total - state["step"]))
        history.append(_history_row(step_report))
        for callback in callbacks:
            callback(step_report)

    try:
        w0 = {n: originals[n].double() for n in names}
        preserved = all_position_sums(bundle, list(config.preserve)) if config.preserve else None
        refined = refine(bundle, config, w0, biases, preserved)
        loras: dict[str, dict[str, torch.Tensor]] = {}
        lora_losses: dict[str, list[float]] = {}
        if with_lora:
            base = {n: refined[n].to(params[n].dtype) for n in names}
            with torch.no_grad():
                for n in names:
                    params[n].copy_(base[n])
            for concept in config.concepts:
                latents, masks, _ = data[concept]
                delta, losses, stopped = train_lora(bundle, config, concept, latents, masks, base, generator, report,
                                                    stop)
                if stopped:
                    return MethodResult("stopped", state["step"], {}, {}, history=history)
                loras[concept] = delta
                window = max(1, min(10, len(losses) // 2))
                lora_losses[concept] = [round(sum(losses[:window]) / window, 6),
                                        round(sum(losses[-window:]) / window, 6)]
        fused = fuse(bundle, config, refined, loras, w0, biases, preserved)
        changed = {n: fused[n].to(params[n].dtype).cpu() for n in names}
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(originals[n])
    extra = {"mace_stages": ["cfr", "lora", "fusion"] if with_lora else ["cfr", "fusion (no LoRA)"]}
    if with_lora:
        extra["mace_masks"] = {c: data[c][2] for c in config.concepts}
        extra["mace_attention_loss"] = lora_losses  # concept -> [mean of the first 10 steps, of the last 10]
    return MethodResult("done", state["step"] if with_lora else 1, changed,
                        {n: originals[n].cpu() for n in names}, extra, history)

"""CA, Concept Ablation (Kumari et al., ICCV'23): overwrite a concept with an anchor concept.

The base model first generates ``anchor_images`` images of the anchor prompts (once, at the start;
kept in the checkpoint). Each step noises a batch of them at uniform timesteps and trains

    model-based (default):  L = C * mean || f_theta(x_t, c_erased, t) - sg(f(x_t, c_anchor, t)) ||^2
    noise-based:            L = C * mean || f_theta(x_t, c_erased, t) - target(x0, noise, t) ||^2

(C latent channels: the reference's masked loss sums over channels and averages over pixels)

where ``f(., c_anchor)`` is the model being trained under stop-gradient (the reference code; the
frozen base with ``anchor_prediction='frozen'``) and ``target`` is what the model should output for
the clean anchor latent (the noise for an epsilon model, the velocity for a v model). With
``prior_preservation`` the batch also holds anchor images under their anchor prompts with the
ordinary diffusion loss, weighted by ``prior_loss_weight``. The reference's diffusers ``train.py``:
AdamW (weight decay 1e-2), gradient norm clipped to 1, no gradient through the start token's
cross-attention keys and values (its Custom Diffusion attention processor), cross-attention keys and
values trained (``xattn_kv``). ``scripts/fidelity_ca.py`` checks the loss and gradients against it.
"""

from __future__ import annotations

import torch

from ..prediction import add_noise, v_target
from ..sampling import initial_latents, sample_latents
from .config import CAConfig
from .loop import FineTuneRun, StepReport, fine_tune_runner

GENERATION_CHUNK = 16  # anchor images sampled per batch (each has its own seed, so the chunk does not matter)
CODEC_CHUNK = 4  # anchor images decoded and re-encoded at once


class CARun(FineTuneRun):
    cfg: CAConfig

    def __init__(self, bundle, config: CAConfig, run_dir, callbacks=None, stop=None):
        super().__init__(bundle, config, run_dir, callbacks, stop)
        self.total_steps = config.iterations
        # the reference's optimizer: AdamW with its weight decay (torch's defaults for betas and eps, as its flags)
        self.optimizer = torch.optim.AdamW(list(self.predictor.params.values()), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.templates = config.templates()
        # image i comes from template i mod n_templates and is trained against concept i mod n_concepts
        self.anchor_states = bundle.encode(config.anchor_prompts())
        erased = [t.format(c=c) for t in self.templates for c in config.concepts]
        self.erased_table = bundle.encode(erased).reshape(len(self.templates), len(config.concepts),
                                                       *self.anchor_states.shape[1:])
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    # ---- the anchor images ---------------------------------------------------------------------------
    def anchor_seeds(self) -> list[int]:
        return [self.cfg.seed + 1 + i for i in range(self.cfg.anchor_images)]

    @torch.no_grad()
    def make_anchor_latents(self) -> None:
        """Sample the anchor images with the base model (DDIM with CFG, one seed per image), then pass
        them through the image codec as the reference encodes its saved images; flipped copies for hflip."""
        cfg, bundle = self.cfg, self.bundle
        seeds = self.anchor_seeds()
        latents, flipped = [], []
        for start in range(0, len(seeds), GENERATION_CHUNK):
            chunk = seeds[start:start + GENERATION_CHUNK]
            rows = [(start + j) % len(self.templates) for j in range(len(chunk))]
            z = sample_latents(bundle, self.anchor_states[rows], initial_latents(bundle, chunk), cfg.ddim_steps,
                               cfg.start_guidance, eta=cfg.anchor_eta, seeds=chunk)
            for part in z.split(CODEC_CHUNK):  # a VAE at 1024 px holds a few images at a time
                images = bundle.decode(part)
                latents.append(bundle.encode_images(images).to(bundle.dtype))
                if cfg.hflip:
                    flipped.append(bundle.encode_images(images.flip(-1)).to(bundle.dtype))
        # contiguous, as a checkpoint stores them: a VAE's output may be channels-last, and convolutions of a
        # channels-last batch round differently, which a resumed run would not repeat
        self.pools["anchor"] = torch.cat(latents).contiguous()
        if cfg.hflip:
            self.pools["anchor_flipped"] = torch.cat(flipped).contiguous()

    def anchor_latents(self) -> torch.Tensor:
        if "anchor" not in self.pools:  # a resumed run has them from its checkpoint
            self.make_anchor_latents()
        return self.pools["anchor"]

    def _perm(self, stream: int, epoch: int) -> torch.Tensor:
        """The order of the anchor images in one epoch (stream 0: ablation rows, 1: prior rows), a
        function of the seed alone, so that a resumed run draws the same batches."""
        key = (stream, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + stream * 100_003 + epoch + 1)
            self._perms = {k: v for k, v in self._perms.items() if k[1] >= epoch - 1}
            self._perms[key] = torch.randperm(self.cfg.anchor_images, generator=g)
        return self._perms[key]

    def batch_indices(self, i: int, stream: int = 0) -> list[int]:
        """Step ``i``'s anchor images: consecutive slices of per-epoch shuffles (the reference's
        shuffled data loader, without its short last batch)."""
        n, b = self.cfg.anchor_images, self.cfg.batch_size
        return [int(self._perm(stream, pos // n)[pos % n]) for pos in range(i * b, (i + 1) * b)]

    # ---- the loss ------------------------------------------------------------------------------------
    def to_loss_space(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss_space == "output":
            return out.float()
        return super().to_loss_space(out, x, t)

    def clean_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output at x_t = add_noise(x0, noise), in the loss space."""
        space, kind = self.cfg.loss_space, self.bundle.prediction_type
        if space == "x0" or (space == "output" and kind == "sample"):
            return x0.float()
        if space == "output" and kind == "v_prediction":
            return v_target(x0.float(), noise.float(), self.alphas[t].view(-1, 1, 1, 1).float())
        return noise.float()

    def loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, erased: torch.Tensor,
             anchor: torch.Tensor, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """CA's loss on given draws: rows [:b] ablate (``erased`` prompt states, ``anchor`` their anchor
        prompts' states), rows [b:] are prior rows under their anchor prompts ``prior``."""
        cfg, pred = self.cfg, self.predictor
        b = len(erased)
        a = self.alphas[t].view(-1, 1, 1, 1).to(x0.dtype)
        x_t = add_noise(x0, noise, a)
        cond = erased if prior is None else torch.cat([erased, prior])
        out = self.to_loss_space(pred.trainable(x_t, t, cond), x_t, t)  # one pass, as the reference
        if cfg.loss_type == "model-based":
            anchor_pred = pred.live if cfg.anchor_prediction == "current" else pred.frozen
            target = self.to_loss_space(anchor_pred(x_t[:b], t[:b], anchor), x_t[:b], t[:b])
        else:
            target = self.clean_target(x0[:b], noise[:b], t[:b])
        # the reference's masked loss with an all-ones mask: squared errors summed over channels and pixels,
        # divided by the pixel count (mask.sum over its one channel), so C (latent channels) x the mean
        ablate = self.mse(out[:b], target.detach()) * out.shape[1]
        loss, losses = ablate, {"ablate": ablate.item()}
        if prior is not None:
            keep = self.mse(out[b:], self.clean_target(x0[b:], noise[b:], t[b:]))
            loss = loss + cfg.prior_loss_weight * keep
            losses["prior"] = keep.item()
        losses["total"] = loss.item()
        return loss, losses

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.clip_and_step()

    def clip_and_step(self) -> None:
        """The reference's clip_grad_norm_ (over the trained weights) and AdamW step."""
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.predictor.params.values()), self.cfg.max_grad_norm)
        self.optimizer.step()

    def step(self, i: int) -> StepReport:
        cfg = self.cfg
        pool = self.anchor_latents()
        idx = self.batch_indices(i, 0)
        b, n_c, n_t = len(idx), len(cfg.concepts), len(self.templates)
        rows = idx + (self.batch_indices(i, 1) if cfg.prior_preservation else [])
        x0 = pool[rows]
        if cfg.hflip:  # each image flipped with probability 1/2 (RandomHorizontalFlip)
            flip = (torch.rand(len(rows), generator=self.generator) < 0.5).to(pool.device)
            x0 = torch.where(flip.view(-1, 1, 1, 1), self.pools["anchor_flipped"][rows], x0)
        t = torch.randint(len(self.alphas), (len(rows),), generator=self.generator).to(self.bundle.device)
        noise = self.randn(*x0.shape)
        erased = torch.stack([self.erased_table[r % n_t, r % n_c] for r in idx])
        anchor = self.anchor_states[[r % n_t for r in idx]]
        prior = self.anchor_states[[r % n_t for r in rows[b:]]] if cfg.prior_preservation else None
        loss, losses = self.loss(x0, noise, t, erased, anchor, prior)
        self.update(loss)
        concepts = list(dict.fromkeys(cfg.concepts[r % n_c] for r in idx))
        return StepReport(step=i + 1, total=self.total_steps, phase="theta", concept=", ".join(concepts),
                          losses=losses, elapsed=0.0, eta=0.0)

    # ---- the reference's attention: no gradient through the start token's keys and values ---------
    def run(self, resume: bool = False) -> dict:
        handles = install_start_token_detach(self.bundle.unet) if self.cfg.detach_start_token else []
        try:
            return super().run(resume)
        finally:
            for handle in handles:
                handle.remove()


def _detach_first_token(module, inputs, output):
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def install_start_token_detach(unet: torch.nn.Module) -> list:
    """Forward hooks on every cross-attention key and value projection that stop the gradient through
    the first token's keys and values, as the reference's ``CustomDiffusionAttnProcessor``
    (``key = detach * key + (1 - detach) * key.detach()`` with ``detach[:, :1] = 0``); outputs are unchanged.
    Returns the hook handles (``handle.remove()`` takes them off)."""
    handles = []
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            handles.append(module.register_forward_hook(_detach_first_token))
    return handles


run_ca = fine_tune_runner(CARun)  # the registry's runner of "ca" (erasure/__init__.py)

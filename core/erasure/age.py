"""Adaptive Guided Erasure (Bui et al., ICLR 2025): erase towards a learned mixture of nearby concepts.

    min_theta max_pi  L1(theta, c_e, e_t) + lambda L2(theta, e_t),   e_t = GS(pi)^T T_C

- L1 (erasure) = || e_theta(z_e, c_e) - [ e*(z_e, sg(e_t)) - eta (e*(z_e, c_e) - e*(z_e, sg(e_t))) ] ||^2
- L2 (preservation) = || e_theta(z_t, e_t) - e*(z_t, e_t) ||^2
- T_C: prompt hidden states of the candidates (prefiltered by L2 distance, see ``vocab.py``);
  GS: Gumbel-softmax, straight-through one-hot (hard) or soft top-k.
- One loop iteration in ``pgd_num_steps`` is a model step; the others are pi steps.
- AP (Bui et al., NeurIPS'24, this method's ancestor) is this runner with ``anchor`` set: L1 maps the
  erased concept to the fixed anchor's frozen prediction instead of the mixture's, and the search only
  picks the concept L2 preserves (the one the current model damages most).
- ``share_draws`` (beyond the paper, for speed): a pi step reuses the preceding model step's draws
  (erased concept, Gumbel sample, "sample till t" latents and timestep) instead of sampling afresh
  as the reference does every iteration; this halves the sampling, the larger part of a CPU step.
- ``batch_pi_chain`` (beyond the paper, for speed): a pi step keeps its own draws, but its "sample till t"
  chain runs in the batch of the model step before it, with the model before that step's update (the
  reference samples after it). An iteration pair then runs its chains side by side instead of one after
  the other: as many sequential UNet calls as the longer chain has steps, for the same arithmetic.

Target search (``target_search``):
- ``gumbel`` (paper, default): pi ascends lambda L2 through the straight-through gradient. As in the
  reference code, L1 gives pi no gradient unless ``pi_l1`` is set.
- ``damage`` (beyond the paper): each pi step measures the preservation damage
  || e_theta(x, T_k) - e*(x, T_k) ||^2 of every candidate k on the erased concept's latents and
  ascends E_softmax(pi)[damage]. Affordable when the candidate set is small or prefiltered.
- ``damage_floor`` (beyond the paper): the damage search with ``near_copy_floor`` at 0.5 unless set
  (``config.DAMAGE_FLOOR``): the damage search's near copies are the candidates it must not pick.

- ``damage_net`` (beyond the paper): the damage search, net of the erasure. A candidate's change
  on the erased concept's latents is split into the part along the erased concept's own change
  (the erasure itself, which preserving the candidate would fight) and the rest; only the rest
  counts as damage. A near copy changes almost only along the erasure, so it scores low without a
  hard floor.
- ``pi_spread`` (beyond the paper, damage searches): an entropy bonus on pi, so that pi settles near
  softmax(damage / pi_spread) over the few most damaged candidates (a shape and a colour relative,
  say) instead of one.
- ``two_stage`` (beyond the paper): the damage search for the first ``damage_stage_fraction`` of the
  run, then pi is reset to uniform over the ``neighbourhood_size`` candidates it ranked highest and
  the paper's search continues within them.

Candidate restrictions and ablations (``pi_mode``, beyond the paper; the default is the paper's):
- ``near_copy_floor`` drops candidates whose frozen output on the erased concept's latents is nearly
  the concept's own (a near copy as target leaves little to erase);
- ``pi_mode``: ``uniform`` freezes pi at 1/n, ``nearest`` fixes the target to the candidate closest
  in text embedding, ``most_damaged`` to the candidate a short ESD-"" probe damages most. Frozen
  modes keep the loop's model steps and skip the pi updates.
- ``erase_check_every`` (erasure-success constraint): every N model steps, generate the erased
  concept with the model being trained, and double the erasure term's weight while the backend's
  classifier still recognises more than ``erase_target_g`` of the images.

Every run records, per erased concept, each candidate's text distance and output distance to the
concept (``targets.csv``), the top targets' distances and ranks, and the erasure term by quarter of
the run (the manifest's ``near_copy`` and ``erase_term``): what the near-copy hypothesis needs.

Each model step logs the candidate it used and whether it is a real neighbour of the erased concept
(when neighbours are known), so a user can see whether the search finds neighbours.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import AGEConfig
from .loop import FineTuneRun, StepReport, fine_tune_runner, load_optimizer_tensors, optimizer_tensors
from ..sampling import guided_ddim_step
from .vocab import CandidateSet, build_candidates, load_vocabulary

TOP_TARGETS = 5
PROBE_BATCH = 64  # candidates per UNet batch of a probe (a 1000-word list on SD)


def gumbel_softmax(logits: torch.Tensor, temperature: float, hard: bool, topk: int,
                   uniform: torch.Tensor) -> torch.Tensor:
    """The reference's Gumbel-softmax: straight-through one-hot, or the renormalised top-k of the sample.
    ``uniform``: the sample's U(0, 1) draws, one per logit (kept by the caller, so a sample can be replayed)."""
    u = uniform.to(logits.device)
    gumbel = -torch.log(-torch.log(u + 1e-10) + 1e-10)
    y = F.softmax((logits + gumbel) / temperature, dim=-1)
    if hard:
        one_hot = F.one_hot(y.argmax(), len(y)).to(y.dtype)
        return one_hot - y.detach() + y
    if topk == 0 or topk >= len(y):  # the whole softmax (AP's soft mode)
        return y
    kth = y.topk(topk).values[-1]
    kept = y * (y >= kth)
    return kept / kept.sum()


class AGERun(FineTuneRun):
    cfg: AGEConfig

    def __init__(self, bundle, config: AGEConfig, run_dir, callbacks=None, stop=None):
        super().__init__(bundle, config, run_dir, callbacks, stop)
        words = config.candidates or load_vocabulary(config.vocab, bundle)
        self.candidates: list[CandidateSet] = []
        for concept in config.concepts:
            others = [c for c in config.concepts if c != concept]
            self.candidates.append(build_candidates(bundle, concept, words, config.prompt_template,
                                                    config.k_closest, config.num_centers,
                                                    exclude=list(config.synonyms) + others))
        # Uniform logits, as the reference initialises pi to 1/n.
        self.pi = [torch.zeros(len(cs.names), device=bundle.device, requires_grad=True) for cs in self.candidates]
        self.pi_optimizer = torch.optim.Adam(self.pi, lr=config.gumbel_lr)
        self.total_steps = config.iterations * config.pgd_num_steps
        self.neighbours = self._neighbours()
        self.pi_log_every = max(1, self.total_steps // 400)
        # share_draws: the model step's draws, kept for the pi step that follows it;
        # batch_pi_chain: that pi step's own draws, its chain run in the model step's batch
        self.shared: dict | None = None
        # The probes below draw from their own generator, so that a run with the paper's settings
        # makes the same draws (and the same weights) as before they existed.
        self.probe_generator = torch.Generator().manual_seed(config.seed + 1)
        self.output_distances = [self._output_distances(k) for k in range(len(self.candidates))]
        # allowed[k]: the candidates pi may weight (a restriction or a fixed target masks the others)
        self.allowed = [self._initial_allowed(k) for k in range(len(self.candidates))]
        self.pi_frozen = config.pi_mode != "learned"
        self.neighbourhood_chosen = config.target_search != "two_stage"
        self.erase_weight = 1.0
        # AP: the erasure maps to a fixed anchor; the searched mixture is only preserved
        self.anchor_states = None if config.anchor is None else bundle.encode([config.anchor])
        if config.erase_check_every:
            self._check_erasure_is_measurable()

    def _neighbours(self) -> dict[str, set[str]] | None:
        if self.cfg.neighbour_groups:
            return {c: set(v) for c, v in self.cfg.neighbour_groups.items()}
        known = {c: self.bundle.backend.neighbours(c) for c in self.cfg.concepts}
        known = {c: n for c, n in known.items() if n is not None}
        return known or None

    # ---- probes of the candidates (before training) -----------------------------------------------
    @torch.no_grad()
    def _probe_latents(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-model latents of erased concept k half-way down the "sample till t" schedule."""
        cfg = self.cfg
        n = cfg.damage_samples
        z = torch.randn((n, *self.bundle.latent_shape), generator=self.probe_generator).to(
            self.bundle.device, self.bundle.dtype)
        cond = self.erased_states[k:k + 1].expand(n, -1, -1)
        uncond = self.uncond.expand(n, -1, -1)
        timesteps = self.scheduler.timesteps
        half = len(timesteps) // 2
        for t in timesteps[:half]:
            z = guided_ddim_step(self.scheduler, self.predictor.frozen, z, t, cond, uncond,
                                 cfg.start_guidance).to(z.dtype)
        return z, timesteps[half].expand(n)

    @torch.no_grad()
    def _candidate_outputs(self, k: int, z: torch.Tensor, t: torch.Tensor, live: bool) -> torch.Tensor:
        """(n_candidates, m, ...) predictions of every candidate at the latents z, in loss space."""
        predict = self.predictor.live if live else self.predictor.frozen
        outs = []
        for states in self.candidates[k].states.to(self.bundle.dtype).split(PROBE_BATCH):
            n, m = len(states), len(z)
            x = z.repeat_interleave(n, dim=0)
            tt = t.repeat_interleave(n)
            out = self.to_loss_space(predict(x, tt, states.repeat(m, 1, 1)), x, tt)
            outs.append(out.view(m, n, *out.shape[1:]).transpose(0, 1))
        return torch.cat(outs)

    @torch.no_grad()
    def _output_distances(self, k: int) -> torch.Tensor:
        """|| e*(z_e, T_j) - e*(z_e, c_e) ||^2 per candidate j: how differently the frozen model treats
        the concept's own latents under candidate j's prompt (small = a near copy, little to erase)."""
        z, t = self._probe_latents(k)
        own = self.to_loss_space(self.predictor.frozen(z, t, self.erased_states[k:k + 1].expand(len(z), -1, -1)), z, t)
        cand = self._candidate_outputs(k, z, t, live=False)
        return (cand - own[None]).pow(2).flatten(2).mean(2).mean(1).cpu()

    def _initial_allowed(self, k: int) -> torch.Tensor:
        cfg, cs = self.cfg, self.candidates[k]
        n = len(cs.names)
        allowed = torch.ones(n, dtype=torch.bool)
        if cfg.near_copy_floor > 0:
            dist = self.output_distances[k]
            allowed &= dist >= cfg.near_copy_floor * dist.median()
            if not allowed.any():
                raise ValueError(f"near_copy_floor {cfg.near_copy_floor} leaves no candidate for {cs.concept!r}")
        if cfg.pi_mode in ("nearest", "most_damaged"):
            score = -cs.distances.cpu() if cfg.pi_mode == "nearest" else self._probe_damage(k)
            score = score.masked_fill(~allowed, -math.inf)
            allowed = torch.zeros(n, dtype=torch.bool)
            allowed[int(score.argmax())] = True
        return allowed.to(self.bundle.device)

    def _probe_damage(self, k: int) -> torch.Tensor:
        """Preservation damage of every candidate after ``damage_probe_steps`` ESD-"" steps on erased
        concept k (the weights and the model optimizer are untouched afterwards): the out-edges of the
        concept graph's row, to first order."""
        cfg, pred = self.cfg, self.predictor
        z, t = self._probe_latents(k)
        c_e = self.erased_states[k:k + 1].expand(len(z), -1, -1)
        empty = self.uncond.expand(len(z), -1, -1)
        probe_optimizer = torch.optim.Adam(list(pred.params.values()), lr=cfg.lr)
        with torch.no_grad():
            f_empty, f_e = pred.frozen(z, t, empty), pred.frozen(z, t, c_e)
            anchor = self.to_loss_space(f_empty - cfg.negative_guidance * (f_e - f_empty), z, t)
        try:
            for _ in range(cfg.damage_probe_steps):
                loss = self.mse(self.to_loss_space(pred.trainable(z, t, c_e), z, t), anchor)
                probe_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                probe_optimizer.step()
            live = self._candidate_outputs(k, z, t, live=True)
            frozen = self._candidate_outputs(k, z, t, live=False)
        finally:
            with torch.no_grad():
                for name, p in pred.params.items():
                    p.copy_(pred.original[name])
        return (live - frozen).pow(2).flatten(2).mean(2).mean(1).cpu()

    def _check_erasure_is_measurable(self) -> None:
        backend = self.bundle.backend
        names = backend.concept_set().concepts if backend.has_evaluator else []
        missing = [c for c in self.cfg.concepts if c not in names]
        if missing:
            raise ValueError(f"the erasure-success constraint needs a classifier that knows the erased concept; "
                             f"the {self.bundle.kind} backend cannot measure {', '.join(map(repr, missing))}")
        concept_set = backend.concept_set()
        self.judge = (concept_set, backend.evaluator(self.bundle, concept_set))

    def _measure_erasure(self, concept: str) -> float:
        """G of ``concept`` with the model being trained: the share of a few images the backend's
        classifier recognises (fixed seeds, so checks differ only by the weights)."""
        from ..sampling import generate

        concept_set, evaluator = self.judge
        prompt = concept_set.template.format(concept=concept)
        images = generate(self.bundle, prompt, list(range(self.cfg.erase_check_images)))
        top = evaluator.topk(images, 1)[:, 0]
        return (top == concept_set.concepts.index(concept)).float().mean().item()

    def is_model_step(self, i: int) -> bool:
        return i % self.cfg.pgd_num_steps == 0

    def model_steps_done(self, n: int) -> int:
        return math.ceil(n / self.cfg.pgd_num_steps)

    # ---- the target mixture ----------------------------------------------------------------------
    def mixture(self, k: int, uniform: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """A Gumbel-softmax sample of concept k's target: weights, embedding, top pick, and the
        sample's uniform draws (to replay it)."""
        cfg = self.cfg
        if uniform is None:
            uniform = torch.rand(self.pi[k].shape, generator=self.generator)
        weights = gumbel_softmax(self.logits(k), cfg.gumbel_temp, cfg.gumbel_hard, cfg.gumbel_topk, uniform)
        states = self.candidates[k].states
        e_t = torch.einsum("n,nld->ld", weights.to(states.dtype), states)[None].to(self.bundle.dtype)
        return weights, e_t, int(weights.detach().argmax()), uniform

    def logits(self, k: int) -> torch.Tensor:
        """pi's logits with the candidates it may not weight at -inf (zero weight, zero gradient)."""
        return self.pi[k].masked_fill(~self.allowed[k], -math.inf)

    def probabilities(self, k: int) -> torch.Tensor:
        return F.softmax(self.logits(k).detach().float(), dim=0)

    def top_targets(self) -> dict[str, list[tuple[str, float]]]:
        out = {}
        for k, cs in enumerate(self.candidates):
            probs = self.probabilities(k)
            top = probs.topk(min(TOP_TARGETS, len(probs)))
            out[cs.concept] = [(cs.names[i], round(float(p), 4)) for p, i in zip(top.values, top.indices)]
        return out

    def _pool_key(self, k: int, weights: torch.Tensor) -> tuple[str, torch.Tensor]:
        """Pool mode: the latents of a mixture come from the pool of one candidate drawn by weight."""
        w = weights.detach().clamp(min=0).float().cpu()
        j = int(torch.multinomial(w / w.sum(), 1, generator=self.generator))
        cs = self.candidates[k]
        return f"cand:{cs.concept}:{cs.names[j]}", cs.states[j:j + 1].to(self.bundle.dtype)

    # ---- one iteration ---------------------------------------------------------------------------
    def step(self, i: int) -> StepReport:
        cfg = self.cfg
        model_step = self.is_model_step(i)
        if not model_step and self._switches_neighbourhood_at(i):
            self._choose_neighbourhood()
        shared, self.shared = (None if model_step else self.shared), None
        k = self.randint(len(cfg.concepts)) if shared is None else shared["k"]
        concept, c_e = cfg.concepts[k], self.erased_states[k:k + 1]
        weights, e_t, pick, uniform = self.mixture(k, None if shared is None else shared["uniform"])
        e_bar = e_t.detach()
        target_key = self._pool_key(k, weights) if cfg.xt_source == "pool" and shared is None else ("mixture", e_bar)
        if model_step:
            (z_e, z_t), t = self._model_step_latents(i, [(concept, c_e), target_key])
            losses = self._model_step(c_e, e_bar, z_e, z_t, t)
            if cfg.share_draws:
                self.shared = {"k": k, "uniform": uniform, "z_e": z_e, "z_t": z_t, "t": t}
            phase = "theta"
            if cfg.erase_check_every and self.model_steps_done(i + 1) % cfg.erase_check_every == 0:
                losses.update(self._erasure_check())
        elif self.pi_frozen:  # an ablation: pi is not searched
            losses, phase = {}, "pi"
        elif self._damage_pi_steps():
            losses = self._damage_pi_step(k, concept, c_e, shared)
            phase = "pi"
        else:
            losses = self._gumbel_pi_step(k, concept, c_e, e_t, e_bar, target_key, shared)
            phase = "pi"
        if phase == "pi" and (i + 1) % self.pi_log_every == 0:
            self._log_pi(i + 1)
        name = self.candidates[k].names[pick]
        neighbours = self.neighbours.get(concept) if self.neighbours else None
        return StepReport(step=i + 1, total=self.total_steps, phase=phase, concept=concept, losses=losses,
                          elapsed=0.0, eta=0.0, targets=self.top_targets(), pick=name,
                          pick_is_neighbour=(name in neighbours) if neighbours is not None else None)

    def _damage_pi_steps(self) -> bool:
        return self.cfg.target_search in ("damage", "damage_floor", "damage_net") or not self.neighbourhood_chosen

    def _pi_latents_ahead(self, i: int) -> list[str] | None:
        """The latents the pi step at ``i`` reads ("z_t": the target mixture's, "z_e": the erased concept's),
        when they can be drawn a step early: None for a model step, a frozen pi, or a pi step that first
        resets pi (the two-stage search's switch)."""
        if i >= self.total_steps or self.is_model_step(i) or self.pi_frozen:
            return None
        if self._switches_neighbourhood_at(i):
            return None
        if self._damage_pi_steps():
            return ["z_e"]
        return ["z_t", "z_e"] if self.cfg.pi_l1 else ["z_t"]

    def _model_step_latents(self, i, keys) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The model step's latents. With ``batch_pi_chain``, also the draws of the pi step after it (its
        concept, Gumbel sample, z_T and timestep), its chain run in the same batch, kept in ``self.shared``."""
        ahead = self._pi_latents_ahead(i + 1) if self.cfg.batch_pi_chain else None
        if ahead is None:
            return self.draw_latents(keys)
        n = self.randint(self.cfg.ddim_steps)
        k = self.randint(len(self.cfg.concepts))
        with torch.no_grad():
            _, e_t, _, uniform = self.mixture(k)
        conds = {"z_t": e_t, "z_e": self.erased_states[k:k + 1]}
        n_pi = self.randint(self.cfg.ddim_steps)
        (own, t), (theirs, t_pi) = self.sample_till_each([([c for _, c in keys], n),
                                                          ([conds[name] for name in ahead], n_pi)])
        self.shared = {"k": k, "uniform": uniform, "t": t_pi, "z_e": None, "z_t": None, **dict(zip(ahead, theirs))}
        return own, t

    def _model_step(self, c_e, e_bar, z_e, z_t, t):
        cfg, pred = self.cfg, self.predictor
        b = len(z_e)
        ex = lambda s: s.expand(b, -1, -1)  # noqa: E731
        erase_to = e_bar if self.anchor_states is None else self.anchor_states
        frozen = pred.frozen(torch.cat([z_e, z_e, z_t]), t.repeat(3), torch.cat([ex(erase_to), ex(c_e), ex(e_bar)]))
        f_e_target, f_e_erased, f_t = frozen.chunk(3)
        live = pred.trainable(torch.cat([z_e, z_t]), t.repeat(2), torch.cat([ex(c_e), ex(e_bar)]))
        l_e, l_t = live.chunk(2)
        anchor = f_e_target - cfg.negative_guidance * (f_e_erased - f_e_target)
        erase = self.mse(self.to_loss_space(l_e, z_e, t), self.to_loss_space(anchor, z_e, t))
        preserve = self.mse(self.to_loss_space(l_t, z_t, t), self.to_loss_space(f_t, z_t, t))
        loss = self.erase_weight * erase + cfg.lam * preserve
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        losses = {"erase": erase.item(), "preserve": preserve.item(), "total": loss.item()}
        if cfg.erase_check_every:
            losses["erase_weight"] = self.erase_weight
        return losses

    def _erasure_check(self) -> dict[str, float]:
        """The erasure-success constraint: raise the erasure weight while an erased concept is still made."""
        worst = max(self._measure_erasure(c) for c in self.cfg.concepts)
        if worst > self.cfg.erase_target_g:
            self.erase_weight = min(self.erase_weight * self.cfg.erase_weight_growth, self.cfg.erase_weight_max)
        return {"erase_check_G": worst}

    def _past_damage_stage(self, i: int) -> bool:
        return i >= round(self.cfg.damage_stage_fraction * self.total_steps)

    def _switches_neighbourhood_at(self, i: int) -> bool:
        """Whether a pi step at ``i`` first resets pi to the damage stage's neighbourhood (two-stage search)."""
        return not self.neighbourhood_chosen and self._past_damage_stage(i)

    def _choose_neighbourhood(self) -> None:
        """Two-stage search: keep the candidates the damage stage ranked highest, with pi uniform over
        them and a fresh pi optimizer for the paper's search within them."""
        with torch.no_grad():
            for k, p in enumerate(self.pi):
                probs = self.probabilities(k)
                keep = probs.topk(min(self.cfg.neighbourhood_size, int(self.allowed[k].sum()))).indices
                allowed = torch.zeros_like(self.allowed[k])
                allowed[keep] = True
                self.allowed[k] = allowed
                p.zero_()
        self.pi_optimizer = torch.optim.Adam(self.pi, lr=self.cfg.gumbel_lr)
        self.neighbourhood_chosen = True

    def _gumbel_pi_step(self, k, concept, c_e, e_t, e_bar, target_key, shared) -> dict[str, float]:
        cfg, pred = self.cfg, self.predictor
        if shared is None:
            keys = [target_key, (concept, c_e)] if cfg.pi_l1 else [target_key]
            latents, t = self.draw_latents(keys)
        else:
            latents, t = [shared["z_t"], shared["z_e"]], shared["t"]
        z_t, b = latents[0], len(latents[0])
        with pred.weights_frozen():
            live = pred.trainable(z_t, t, e_t.expand(b, -1, -1))
            frozen = pred.frozen(z_t, t, e_bar.expand(b, -1, -1))
            preserve = self.mse(self.to_loss_space(live, z_t, t), self.to_loss_space(frozen, z_t, t))
            objective = cfg.lam * preserve
            losses = {"preserve": preserve.item()}
            if cfg.pi_l1:
                z_e = latents[1]
                with torch.no_grad():
                    l_e = pred.trainable(z_e, t, c_e.expand(b, -1, -1))
                    f_e = pred.frozen(z_e, t, c_e.expand(b, -1, -1))
                f_target = pred.frozen_with_grad(z_e, t, e_t.expand(b, -1, -1))
                anchor = f_target - cfg.negative_guidance * (f_e - f_target)
                erase = self.mse(self.to_loss_space(l_e, z_e, t), self.to_loss_space(anchor, z_e, t))
                objective = objective + erase
                losses["erase"] = erase.item()
        self.pi_optimizer.zero_grad(set_to_none=True)
        (-objective).backward()
        self.pi_optimizer.step()
        losses["pi_objective"] = objective.item()
        return losses

    def _damage_pi_step(self, k, concept, c_e, shared) -> dict[str, float]:
        cfg, pred = self.cfg, self.predictor
        (z_e,), t = self.draw_latents([(concept, c_e)]) if shared is None else ([shared["z_e"]], shared["t"])
        m = min(cfg.damage_samples, len(z_e))
        states = self.candidates[k].states.to(self.bundle.dtype)
        n = len(states)
        x = z_e[:m].repeat_interleave(n, dim=0)
        tt = t[:m].repeat_interleave(n)
        cond = states.repeat(m, 1, 1)
        with torch.no_grad():
            change = (self.to_loss_space(pred.trainable(x, tt, cond), x, tt)
                      - self.to_loss_space(pred.frozen(x, tt, cond), x, tt)).flatten(1).view(m, n, -1)
            if cfg.target_search == "damage_net":
                x_e, t_e, s_e = z_e[:m], t[:m], c_e.expand(m, -1, -1)
                own = (self.to_loss_space(pred.trainable(x_e, t_e, s_e), x_e, t_e)
                       - self.to_loss_space(pred.frozen(x_e, t_e, s_e), x_e, t_e)).flatten(1)
                change = net_of_erasure(change, own)
            damage = change.pow(2).mean(2).mean(0)
        probs = F.softmax(self.logits(k), dim=0)
        allowed = self.allowed[k]
        if cfg.pi_spread > 0:  # the entropy's weight is relative to the step's largest damage
            damage = damage / damage[allowed].max().clamp(min=1e-12)
        objective = (probs * damage.to(probs.dtype)).masked_fill(~allowed, 0).sum() * cfg.lam
        if cfg.pi_spread > 0:
            objective = objective - cfg.pi_spread * cfg.lam * (probs * probs.clamp(min=1e-12).log()).masked_fill(~allowed, 0).sum()
        self.pi_optimizer.zero_grad(set_to_none=True)
        (-objective).backward()
        self.pi_optimizer.step()
        return {"pi_objective": objective.item(), "max_damage": damage.max().item()}

    def _log_pi(self, step: int) -> None:
        """pi over training, for the 'target over time' view (kept in the checkpoint's history)."""
        for k, cs in enumerate(self.candidates):
            probs = self.probabilities(k).tolist()
            self.pi_history.append({"step": step, "concept": cs.concept,
                                    "pi": {n: round(p, 5) for n, p in zip(cs.names, probs)}})

    # ---- state and results -----------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        tensors = {f"pi/{k}": p.detach() for k, p in enumerate(self.pi)}
        tensors.update({f"allowed/{k}": a for k, a in enumerate(self.allowed)})
        tensors["search_state"] = torch.tensor([float(self.neighbourhood_chosen), self.erase_weight])
        tensors.update(optimizer_tensors(self.pi_optimizer, "piopt"))
        if self.shared is not None:
            tensors["shared/k"] = torch.tensor([self.shared["k"]])
            tensors.update({f"shared/{name}": self.shared[name] for name in ("uniform", "z_e", "z_t", "t")
                            if self.shared[name] is not None})  # batch_pi_chain draws only what its pi step reads
        return tensors

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in enumerate(self.pi):
                p.copy_(tensors[f"pi/{k}"].to(p.device))
            for k in range(len(self.allowed)):
                self.allowed[k] = tensors[f"allowed/{k}"].to(self.bundle.device)
        chosen, self.erase_weight = tensors["search_state"].tolist()
        self.neighbourhood_chosen = bool(chosen)
        load_optimizer_tensors(self.pi_optimizer, tensors, "piopt")
        if "shared/k" in tensors:
            device, dtype = self.bundle.device, self.bundle.dtype
            latents = {name: tensors[f"shared/{name}"].to(device, dtype) if f"shared/{name}" in tensors else None
                       for name in ("z_e", "z_t")}
            self.shared = {"k": int(tensors["shared/k"]), "uniform": tensors["shared/uniform"],
                           "t": tensors["shared/t"].to(device), **latents}

    def extra_results(self, run_dir: Path) -> dict:
        import pandas as pd

        rows = []
        for k, cs in enumerate(self.candidates):
            probs = self.probabilities(k).cpu()
            neighbours = self.neighbours.get(cs.concept) if self.neighbours else None
            for name, dist, out_dist, allowed, p in zip(cs.names, cs.distances.tolist(),
                                                        self.output_distances[k].tolist(),
                                                        self.allowed[k].tolist(), probs.tolist()):
                rows.append({"concept": cs.concept, "candidate": name, "l2_distance": dist,
                             "output_distance": out_dist, "allowed": allowed, "pi": p,
                             "is_neighbour": (name in neighbours) if neighbours is not None else None})
        pd.DataFrame(rows).to_csv(run_dir / "targets.csv", index=False)
        summary = {"targets": self.top_targets(),
                   "candidates": {cs.concept: len(cs.names) for cs in self.candidates},
                   "excluded_candidates": {cs.concept: cs.excluded for cs in self.candidates},
                   "pi_mode": self.cfg.pi_mode,
                   "near_copy": self._near_copy_summary(),
                   "erase_term": self._erase_term_by_quarter()}
        if self.cfg.erase_check_every:
            summary["erase_weight"] = self.erase_weight
        if self.neighbours:
            picks = [r for r in self.history if r["phase"] == "theta" and r.get("pick_is_neighbour") is not None]
            chance = {cs.concept: sum(n in self.neighbours.get(cs.concept, set()) for n in cs.names) / len(cs.names)
                      for cs in self.candidates}
            summary["neighbour_picks"] = {
                "share": sum(bool(r["pick_is_neighbour"]) for r in picks) / max(1, len(picks)),
                "share_last_quarter": _share(picks[-max(1, len(picks) // 4):]),
                "chance": sum(chance.values()) / len(chance),
            }
        return summary


    def _near_copy_summary(self) -> dict[str, list[dict]]:
        """The top targets with their distance to the erased concept: text L2 and frozen output
        distance, each also as a rank among the candidates (0 = the nearest) and as a share of the median."""
        out = {}
        for k, cs in enumerate(self.candidates):
            probs, text, output = self.probabilities(k), cs.distances.cpu(), self.output_distances[k]
            text_rank, output_rank = text.argsort().argsort(), output.argsort().argsort()
            top = probs.topk(min(TOP_TARGETS, len(probs))).indices.tolist()
            out[cs.concept] = [{"candidate": cs.names[j], "pi": round(float(probs[j]), 4),
                                "text_l2": round(float(text[j]), 4), "text_rank": int(text_rank[j]),
                                "output_distance": round(float(output[j]), 5), "output_rank": int(output_rank[j]),
                                "output_vs_median": round(float(output[j] / output.median()), 3)} for j in top]
        return out

    def _erase_term_by_quarter(self) -> dict[str, list[float]]:
        """Mean erasure term of each concept's model steps, per quarter of the run: an erasure term
        that shrinks to nothing early means the target leaves little to erase."""
        out = {}
        for concept in self.cfg.concepts:
            values = [r["erase"] for r in self.history if r["phase"] == "theta" and r["concept"] == concept]
            if values:
                q = max(1, math.ceil(len(values) / 4))
                out[concept] = [round(sum(c) / len(c), 6) for c in (values[i:i + q] for i in range(0, len(values), q))]
        return out


def net_of_erasure(change: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Candidates' changes (m, n, d) less their part along the erased concept's own change (m, d) on
    the same latents, where the two point alike: what is left is damage the erasure does not need."""
    own = own[:, None]
    coef = (change * own).sum(2, keepdim=True) / own.pow(2).sum(2, keepdim=True).clamp(min=1e-12)
    return change - coef.clamp(min=0) * own


def _share(rows: list[dict]) -> float:
    return sum(bool(r["pick_is_neighbour"]) for r in rows) / max(1, len(rows))


run_age = fine_tune_runner(AGERun)  # the registry's runner of "age" (erasure/__init__.py)

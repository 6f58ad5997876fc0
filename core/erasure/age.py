"""Adaptive Guided Erasure (Bui et al., ICLR 2025): erase towards a learned mixture of nearby concepts.

    min_theta max_pi  L1(theta, c_e, e_t) + lambda L2(theta, e_t),   e_t = GS(pi)^T T_C

- L1 (erasure) = || e_theta(z_e, c_e) - [ e*(z_e, sg(e_t)) - eta (e*(z_e, c_e) - e*(z_e, sg(e_t))) ] ||^2
- L2 (preservation) = || e_theta(z_t, e_t) - e*(z_t, e_t) ||^2
- T_C: prompt hidden states of the candidates (prefiltered by L2 distance, see ``vocab.py``);
  GS: Gumbel-softmax, straight-through one-hot (hard) or soft top-k.
- One loop iteration in ``pgd_num_steps`` is a model step; the others are pi steps.
- ``share_draws`` (beyond the paper, for speed): a pi step reuses the preceding model step's draws
  (erased concept, Gumbel sample, "sample till t" latents and timestep) instead of sampling afresh
  as the reference does every iteration; this halves the sampling, the larger part of a CPU step.

Target search (``target_search``):
- ``gumbel`` (paper, default): pi ascends lambda L2 through the straight-through gradient. As in the
  reference code, L1 gives pi no gradient unless ``pi_l1`` is set.
- ``damage`` (beyond the paper): each pi step measures the preservation damage
  || e_theta(x, T_k) - e*(x, T_k) ||^2 of every candidate k on the erased concept's latents and
  ascends E_softmax(pi)[damage]. Affordable when the candidate set is small or prefiltered.

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
from .registry import Method, register_method
from .vocab import CandidateSet, build_candidates, load_vocabulary

TOP_TARGETS = 5


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
    kth = y.topk(min(topk, len(y))).values[-1]
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
        # share_draws: the model step's draws, kept for the pi step that follows it
        self.shared: dict | None = None

    def _neighbours(self) -> dict[str, set[str]] | None:
        if self.cfg.neighbour_groups:
            return {c: set(v) for c, v in self.cfg.neighbour_groups.items()}
        known = {c: self.bundle.backend.neighbours(c) for c in self.cfg.concepts}
        known = {c: n for c, n in known.items() if n is not None}
        return known or None

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
        weights = gumbel_softmax(self.pi[k], cfg.gumbel_temp, cfg.gumbel_hard, cfg.gumbel_topk, uniform)
        states = self.candidates[k].states
        e_t = torch.einsum("n,nld->ld", weights.to(states.dtype), states)[None].to(self.bundle.dtype)
        return weights, e_t, int(weights.detach().argmax()), uniform

    def top_targets(self) -> dict[str, list[tuple[str, float]]]:
        out = {}
        for cs, logits in zip(self.candidates, self.pi):
            probs = F.softmax(logits.detach().float(), dim=0)
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
        shared, self.shared = (None if model_step else self.shared), None
        k = self.randint(len(cfg.concepts)) if shared is None else shared["k"]
        concept, c_e = cfg.concepts[k], self.erased_states[k:k + 1]
        weights, e_t, pick, uniform = self.mixture(k, None if shared is None else shared["uniform"])
        e_bar = e_t.detach()
        target_key = self._pool_key(k, weights) if cfg.xt_source == "pool" and shared is None else ("mixture", e_bar)
        if model_step:
            losses, latents, t = self._model_step(concept, c_e, e_bar, target_key)
            if cfg.share_draws:
                self.shared = {"k": k, "uniform": uniform, "z_e": latents[0], "z_t": latents[1], "t": t}
            phase = "theta"
        elif cfg.target_search == "damage":
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

    def _model_step(self, concept, c_e, e_bar, target_key):
        cfg, pred = self.cfg, self.predictor
        (z_e, z_t), t = self.draw_latents([(concept, c_e), target_key])
        b = len(z_e)
        ex = lambda s: s.expand(b, -1, -1)  # noqa: E731
        frozen = pred.frozen(torch.cat([z_e, z_e, z_t]), t.repeat(3), torch.cat([ex(e_bar), ex(c_e), ex(e_bar)]))
        f_e_target, f_e_erased, f_t = frozen.chunk(3)
        live = pred.trainable(torch.cat([z_e, z_t]), t.repeat(2), torch.cat([ex(c_e), ex(e_bar)]))
        l_e, l_t = live.chunk(2)
        anchor = f_e_target - cfg.negative_guidance * (f_e_erased - f_e_target)
        erase = self.mse(self.to_loss_space(l_e, z_e, t), self.to_loss_space(anchor, z_e, t))
        preserve = self.mse(self.to_loss_space(l_t, z_t, t), self.to_loss_space(f_t, z_t, t))
        loss = erase + cfg.lam * preserve
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"erase": erase.item(), "preserve": preserve.item(), "total": loss.item()}, (z_e, z_t), t

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
            live = self.to_loss_space(pred.trainable(x, tt, cond), x, tt)
            frozen = self.to_loss_space(pred.frozen(x, tt, cond), x, tt)
            damage = (live - frozen).pow(2).flatten(1).mean(1).view(m, n).mean(0)
        objective = (F.softmax(self.pi[k], dim=0) * damage.to(self.pi[k].dtype)).sum() * cfg.lam
        self.pi_optimizer.zero_grad(set_to_none=True)
        (-objective).backward()
        self.pi_optimizer.step()
        return {"pi_objective": objective.item(), "max_damage": damage.max().item()}

    def _log_pi(self, step: int) -> None:
        """pi over training, for the 'target over time' view (kept in the checkpoint's history)."""
        for cs, logits in zip(self.candidates, self.pi):
            probs = F.softmax(logits.detach().float(), dim=0).tolist()
            self.history.append({"step": step, "phase": "pi_distribution", "concept": cs.concept,
                                 "pi": {n: round(p, 5) for n, p in zip(cs.names, probs)}})

    # ---- state and results -----------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        tensors = {f"pi/{k}": p.detach() for k, p in enumerate(self.pi)}
        tensors.update(optimizer_tensors(self.pi_optimizer, "piopt"))
        if self.shared is not None:
            tensors["shared/k"] = torch.tensor([self.shared["k"]])
            tensors.update({f"shared/{name}": self.shared[name] for name in ("uniform", "z_e", "z_t", "t")})
        return tensors

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in enumerate(self.pi):
                p.copy_(tensors[f"pi/{k}"].to(p.device))
        load_optimizer_tensors(self.pi_optimizer, tensors, "piopt")
        if "shared/k" in tensors:
            device = self.bundle.device
            self.shared = {"k": int(tensors["shared/k"]), "uniform": tensors["shared/uniform"],
                           "z_e": tensors["shared/z_e"].to(device, self.bundle.dtype),
                           "z_t": tensors["shared/z_t"].to(device, self.bundle.dtype),
                           "t": tensors["shared/t"].to(device)}

    def extra_results(self, run_dir: Path) -> dict:
        import pandas as pd

        rows = []
        for cs, logits in zip(self.candidates, self.pi):
            probs = F.softmax(logits.detach().float(), dim=0).cpu()
            neighbours = self.neighbours.get(cs.concept) if self.neighbours else None
            for name, dist, p in zip(cs.names, cs.distances.tolist(), probs.tolist()):
                rows.append({"concept": cs.concept, "candidate": name, "l2_distance": dist, "pi": p,
                             "is_neighbour": (name in neighbours) if neighbours is not None else None})
        pd.DataFrame(rows).to_csv(run_dir / "targets.csv", index=False)
        summary = {"targets": self.top_targets(),
                   "candidates": {cs.concept: len(cs.names) for cs in self.candidates},
                   "excluded_candidates": {cs.concept: cs.excluded for cs in self.candidates}}
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


def _share(rows: list[dict]) -> float:
    return sum(bool(r["pick_is_neighbour"]) for r in rows) / max(1, len(rows))


register_method(Method("age", "AGE (adaptive targets)", AGEConfig, fine_tune_runner(AGERun),
                       "the paper's min-max fine-tuning towards a learned mixture of nearby concepts"))

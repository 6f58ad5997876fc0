"""ESD (Gandikota et al., ICCV'23): erase by mapping a concept to a fixed target with negative guidance.

    L = || e_theta(z, c_e) - [ e*(z, c_t) - eta (e*(z, c_e) - e*(z, c_t)) ] ||^2
        + w || e_theta(z, "") - e*(z, "") ||^2          (w = 0 for ESD, 0.1 in train-naive.py)

ESD-x trains the cross-attention (``xattn``), ESD-u everything else (``noxattn``).
"""

from __future__ import annotations

import torch

from .config import ESDConfig
from .loop import FineTuneRun, StepReport, fine_tune_runner


class ESDRun(FineTuneRun):
    cfg: ESDConfig

    def __init__(self, bundle, config: ESDConfig, run_dir, callbacks=None, stop=None):
        super().__init__(bundle, config, run_dir, callbacks, stop)
        self.target_states = bundle.encode([config.target])
        self.total_steps = config.iterations

    def step(self, i: int) -> StepReport:
        cfg, pred = self.cfg, self.predictor
        k = self.randint(len(cfg.concepts))
        concept, c_e = cfg.concepts[k], self.erased_states[k:k + 1]
        (z,), t = self.draw_latents([(concept, c_e)])
        b = len(z)
        frozen = pred.frozen(z.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([c_e.expand(b, -1, -1), self.target_states.expand(b, -1, -1)]))
        f_e, f_t = frozen.chunk(2)
        target = self.to_loss_space(f_t - cfg.negative_guidance * (f_e - f_t), z, t)
        live = pred.trainable(z, t, c_e.expand(b, -1, -1))
        erase = self.mse(self.to_loss_space(live, z, t), target)
        loss, losses = erase, {"erase": erase.item()}
        if cfg.preserve_weight > 0:
            keep_live = pred.trainable(z, t, self.uncond.expand(b, -1, -1))
            keep_frozen = pred.frozen(z, t, self.uncond.expand(b, -1, -1))
            keep = self.mse(self.to_loss_space(keep_live, z, t), self.to_loss_space(keep_frozen, z, t))
            loss = loss + cfg.preserve_weight * keep
            losses["preserve"] = keep.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        losses["total"] = loss.item()
        return StepReport(step=i + 1, total=self.total_steps, phase="theta", concept=concept, losses=losses,
                          elapsed=0.0, eta=0.0)


run_esd = fine_tune_runner(ESDRun)  # the registry's runner of "esd" (erasure/__init__.py)

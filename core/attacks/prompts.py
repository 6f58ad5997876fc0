"""Prompt probes: a fixed set of prompts, no optimisation; costs only generation.

A model backend may ship probes of its own (the toy world's, built from its words); on any model a CSV in the
format of the I2P, Ring-A-Bell, MMA and UnlearnDiff prompt sets can be given instead: a ``prompt``
column, an optional seed (``seed``, ``evaluation_seed`` or ``sd_seed``) and an optional guidance
(``guidance``, ``evaluation_guidance``, ``sd_guidance_scale`` or ``guidance_scale``). Rows without a
seed use the attack's seeds.
"""

from __future__ import annotations

from .common import AttackTarget, Probe, check_stop
from .config import PromptsConfig, read_prompts_csv


class PromptsAttack:
    name = "prompts"
    config_class = PromptsConfig
    # the probes do not depend on the UNet, so the base-model baseline reuses them
    depends_on_weights = False

    def learn(self, target: AttackTarget, concept: str, config: PromptsConfig, progress=None, stop=None):
        bundle = target.bundle
        if config.prompts_file:
            rows = read_prompts_csv(config.prompts_file)
            items = [("file", r["prompt"], [r["seed"]] if r["seed"] is not None else config.seed_list, r["guidance"])
                     for r in rows]
        elif (own := bundle.backend.probe_prompts(concept)) is not None:
            items = [(kind, p, config.seed_list, config.guidance) for kind, p in own]
        else:
            raise ValueError("on this model the prompts attack needs a prompts CSV (--prompts FILE: prompt, "
                             "seed, guidance, as the I2P / Ring-A-Bell / UnlearnDiff sets)")
        probes = []
        for i, (kind, prompt, seeds, guidance) in enumerate(items):
            check_stop(stop)
            probes.append(Probe(prompt, bundle.encode([prompt]), seeds, guidance, kind))
            if progress:
                progress("encode prompts", i + 1, len(items))
        return probes, {"prompts": [p.label for p in probes]}, {}

"""Recovery attacks: can an erased concept come back?

Each attack takes an erased run and its concept and returns the recovered images, the attack success
rate (ASR: the share of attack images the evaluator recognises as the concept, top-1) and what it
learned. Two baselines always come with it: the same attack on the base model (does the attack work
at all?) and the plain prompt on the erased model (the erasure as measured without an attacker).

    from age_explorer.core.attacks import run_attack
    result = run_attack("runs/age-red-circle", "embedding", steps=200)
    print(result.asr, result.asr_base, result.asr_plain, result.learned["nearest_words"])

Attacks: ``prompts`` (fixed probes, or a CSV), ``embedding`` (textual inversion / CCE), ``perturb``
(UnlearnDiffAtk-style bounded perturbation of the prompt's token embeddings).
"""

from __future__ import annotations

from .config import AttackConfig, EmbeddingConfig, PerturbConfig, PromptsConfig, read_prompts_csv
from .registry import ATTACKS, Attack, AttackType, get_attack, make_attack_config, register_attack

__all__ = ["ATTACKS", "Attack", "AttackType", "register_attack", "get_attack", "make_attack_config", "run_attack",
           "compare_runs", "attack_folder", "free_attack_folder", "read_result", "AttackResult", "AttackStopped",
           "AttackTarget", "AttackConfig", "PromptsConfig", "EmbeddingConfig", "PerturbConfig", "read_prompts_csv",
           "RESULT", "ATTACK_KIND"]

# The built-in attacks. Importing this package loads no torch (the CLI's --help, the explorer's lists):
# each implementation is named by "module:Class" and imported by the attack's first run.
register_attack(AttackType("prompts", PromptsConfig, ".prompts:PromptsAttack",
                           "fixed probes that avoid the erased wording (the world's own, or a prompts CSV)"))
register_attack(AttackType("embedding", EmbeddingConfig, ".embedding:EmbeddingAttack",
                           "learn new token embeddings on the erased model (textual inversion / CCE)"))
register_attack(AttackType("perturb", PerturbConfig, ".perturb:PerturbAttack",
                           "a bounded perturbation of the prompt's token embeddings (UnlearnDiffAtk)"))

_RUN = {"run_attack", "compare_runs", "attack_folder", "free_attack_folder", "read_result", "AttackResult",
        "RESULT", "ATTACK_KIND"}
_COMMON = {"AttackStopped", "AttackTarget"}


def __getattr__(name: str):
    # running an attack needs torch: loaded on first use, not with the registry
    if name in _RUN:
        from . import run

        return getattr(run, name)
    if name in _COMMON:
        from . import common

        return getattr(common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

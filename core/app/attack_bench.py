"""Benchmark of the recovery attacks: seconds of each attack on the toy world, and the per-step cost on
the SD-1.4 architecture with random weights (nothing to download; runs on CPU with tiny step counts).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch

from ..bundle import ModelBundle
from ..sampling import initial_latents, sample_latents
from ..attacks import ATTACKS, get_attack, make_attack_config, run_attack
from ..attacks.common import AttackTarget

TOY_TARGETS = {"prompts": 15.0, "embedding": 180.0, "perturb": 180.0}  # the targets, seconds on 2 CPU cores


def toy_attack_seconds(concept: str = "red circle", steps: int | None = None) -> list[dict]:
    """Each attack with its defaults on a UCE erasure of ``concept`` (closed form: no erasure time)."""
    from ..bundle import load_bundle
    from ..erasure import erase, make_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle("toy", device="cpu")
        erase(bundle, make_config("uce", "toy-uce", concepts=[concept]), Path(tmp) / "run")
        target = AttackTarget(Path(tmp) / "run", device="cpu")
        for attack in ATTACKS:
            options = {"steps": steps} if steps and attack != "prompts" else {}
            config = make_attack_config(attack, **options)
            result = run_attack(None, attack, config, target=target, write=False)
            rows.append({"attack": attack, "steps": getattr(config, "steps", "-"),
                         "images": sum(_count(s) for s in result.probes.seeds),
                         "seconds": result.seconds, "with baselines": result.seconds_total,
                         "target": TOY_TARGETS.get(attack)})  # a plugin attack has none
    return rows


def _count(seeds: str) -> int:
    if "-" in seeds:
        lo, hi = seeds.split("-")
        return int(hi) - int(lo) + 1
    return len(seeds.split(","))


def random_sd14_text_bundle(device: torch.device) -> ModelBundle:
    """SD-1.4's UNet and CLIP ViT-L/14 text encoder architectures with random weights, and a word-level
    tokenizer over a dense 49408-token vocabulary (so that placeholder tokens get the ids SD's would)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    from .bench import random_sd14_bundle

    bundle = random_sd14_bundle(device)
    vocab = {f"w{i}": i for i in range(49406)}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    for i, word in enumerate(("a", "photo", "of", "erased", "concept")):
        vocab[word] = vocab.pop(f"w{i}")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bundle.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=77,
                                               bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    bundle.text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768)).to(device).eval()
    return bundle


class _FixedTarget:
    """A bundle attacked as is: base and erased weights are the same (timing only)."""

    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle

    @contextlib.contextmanager
    def weights(self, which: str):
        yield self.bundle


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sd14_step_seconds(device: str = "cpu", steps: int | None = None, batch_size: int = 1) -> list[dict]:
    """Seconds per optimisation step (embedding, perturb; text encoder + UNet forward and backward) and per
    DDIM step of generation with CFG (one image), the unit cost of every attack's images."""
    from ..device import resolve_device

    dev = resolve_device(device)
    bundle = random_sd14_text_bundle(dev)
    target = _FixedTarget(bundle)
    steps = steps or 3
    rows = []
    cond = bundle.encode(["a photo of a erased concept"])
    seconds = {}
    for n in (1, 1, 1 + steps):  # a warm-up call first; then the cost per step is the difference
        _sync(dev)
        start = time.perf_counter()
        sample_latents(bundle, cond, initial_latents(bundle, [0]), n, 7.5)
        _sync(dev)
        seconds[n] = time.perf_counter() - start
    rows.append({"attack": "prompts (generation)", "unit": "DDIM step, 1 image, CFG",
                 "seconds": (seconds[1 + steps] - seconds[1]) / steps})
    for attack in ("embedding", "perturb"):
        config = make_attack_config(attack, concept="erased concept", template="a photo of a {c}", steps=steps + 1,
                                    train_images=1, sample_steps=1, batch_size=batch_size, seeds="1000")
        stamps: list[float] = []

        def clock(stage, done, total):
            if stage == "optimise":
                _sync(dev)
                stamps.append(time.perf_counter())

        get_attack(attack).load()().learn(target, "erased concept", config, progress=clock)
        rows.append({"attack": attack, "unit": f"optimisation step, batch {batch_size}",
                     "seconds": (stamps[-1] - stamps[0]) / (len(stamps) - 1)})  # the first step is warm-up
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(f"recovery attacks, {title} ({torch.get_num_threads()} CPU threads)")
    if "target" in rows[0]:
        print(f"{'attack':10s} {'steps':>6s} {'images':>7s} {'seconds':>8s} {'with baselines':>15s} {'target':>7s}")
        for r in rows:
            if r["target"] is None:
                target = f"{'-':>7s}"
            else:
                target = f"{r['target']:5.0f} s {'met' if r['seconds'] <= r['target'] else 'MISSED'}"
            print(f"{r['attack']:10s} {str(r['steps']):>6s} {r['images']:7d} {r['seconds']:8.1f} "
                  f"{r['with baselines']:15.1f} {target}")
    else:
        print(f"{'attack':22s} {'unit':32s} {'seconds':>8s}")
        for r in rows:
            print(f"{r['attack']:22s} {r['unit']:32s} {r['seconds']:8.3f}")

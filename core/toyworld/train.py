"""The recipe that trains the embedded toy model: classifier first, then UNet + text encoder jointly.

``age-explorer toyworld train --out DIR`` runs it; the result is a model folder loadable by
``core.bundle.load_bundle(DIR)`` and the committed ``assets/toyworld`` was made this way.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..files import environment_versions, write_json_atomic
from ..prediction import add_noise, v_target
from .classifier import ToyClassifier, augment
from .concepts import ToyWorld
# the recipe's fields, without torch: `age-explorer toyworld train --help` builds its flags from them
from .config import ToyTrainConfig
from .model import (MAX_TOKENS, build_scheduler, build_text_encoder, build_tokenizer, build_unet,
                    images_to_latents)
from .render import render


def weights_revision(*modules: torch.nn.Module) -> str:
    """A short content hash of the weights: graphs record it, so a retrained model does not reuse them."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "toy-" + digest.hexdigest()[:12]


def _lr_lambda(cfg: ToyTrainConfig) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def train_classifier(world: ToyWorld, cfg: ToyTrainConfig, progress: bool = True) -> ToyClassifier:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = 30000
    labels = torch.randint(len(world.concepts), (n,), generator=gen)
    plain = render(world, labels[: n // 2], gen)
    # Half the pool has strongly tinted backgrounds, so that a sample's tinted background is not a cue.
    tinted = render(world, labels[n // 2:], gen, background_tint=0.5)
    images = torch.cat([plain, tinted])
    model = ToyClassifier(len(world.concepts))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.classifier_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.classifier_lr, total_steps=cfg.classifier_steps)
    model.train()
    for _ in tqdm(range(cfg.classifier_steps), desc="classifier", disable=not progress):
        idx = torch.randint(n, (128,), generator=gen)
        loss = F.cross_entropy(model(augment(images[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _caption_table(world: ToyWorld, tokenizer) -> tuple[list[str], dict[tuple[int, str, int], int]]:
    """All captions the recipe can draw, and an index (concept, kind, template) -> caption row."""
    captions: list[str] = [""]
    index: dict[tuple[int, str, int], int] = {}
    for c in world.concepts:
        for t, template in enumerate(world.train_templates):
            for kind, text in (("full", c.name), ("colour_only", c.colour), ("shape_only", c.shape)):
                caption = template.format(c=text)
                if caption not in captions:
                    captions.append(caption)
                index[(c.index, kind, t)] = captions.index(caption)
    return captions, index


def _draw_caption_rows(world: ToyWorld, labels: torch.Tensor, index, gen: torch.Generator) -> torch.Tensor:
    mix = world.caption_mix
    u = torch.rand(len(labels), generator=gen)
    templates = torch.randint(len(world.train_templates), (len(labels),), generator=gen)
    rows = []
    for label, ui, t in zip(labels.tolist(), u.tolist(), templates.tolist()):
        if ui < mix["empty"]:
            rows.append(0)
            continue
        ui -= mix["empty"]
        kind = "colour_only" if ui < mix["colour_only"] else (
            "shape_only" if ui < mix["colour_only"] + mix["shape_only"] else "full")
        rows.append(index[(label, kind, t)])
    return torch.tensor(rows)


def save_model_folder(out: Path, unet, text_encoder, tokenizer, scheduler, classifier: ToyClassifier,
                      concepts_json: Path, manifest: dict) -> None:
    """Write a complete, loadable toy model folder; each part is written to a temp name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    parts = {"unet": unet.save_pretrained, "text_encoder": text_encoder.save_pretrained,
             "tokenizer": tokenizer.save_pretrained, "scheduler": scheduler.save_pretrained}
    for name, save in parts.items():
        tmp = out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        shutil.rmtree(out / name, ignore_errors=True)
        tmp.rename(out / name)
    tmp = out / ".classifier.safetensors.tmp"
    classifier.save(tmp)
    tmp.replace(out / "classifier.safetensors")
    if concepts_json.resolve() != (out / "concepts.json").resolve():
        shutil.copyfile(concepts_json, out / "concepts.json")
    write_json_atomic(out / "manifest.json", manifest)


def train_toy_model(out_dir: str | Path, concepts_json: str | Path, cfg: ToyTrainConfig,
                    progress: bool = True) -> Path:
    out = Path(out_dir)
    world = ToyWorld.from_json(concepts_json)
    torch.manual_seed(cfg.seed)
    started = time.time()

    gen = torch.Generator().manual_seed(cfg.seed + 2)
    tokenizer = build_tokenizer(world.vocabulary())
    if cfg.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        source = Path(cfg.init_from)
        classifier = ToyClassifier.load(source / "classifier.safetensors")
        text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(source / "unet")
        previous = json.loads((source / "manifest.json").read_text())
        gen.manual_seed(cfg.seed + 2 + int(previous.get("trained_steps", 0)))
    else:
        classifier = train_classifier(world, cfg, progress)
        text_encoder = build_text_encoder(tokenizer)
        unet = build_unet(cross_attention_dim=text_encoder.config.hidden_size)
        previous = None
    scheduler = build_scheduler(cfg.prediction_type)
    captions, index = _caption_table(world, tokenizer)
    caption_ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids

    pool_labels = torch.randint(len(world.concepts), (cfg.pool_size,), generator=gen)
    pool = torch.cat([render(world, pool_labels[i:i + 5000], gen) for i in range(0, cfg.pool_size, 5000)])

    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": cfg.lr},
        {"params": text_encoder.parameters(), "lr": cfg.text_lr},
    ], weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    alphas = scheduler.alphas_cumprod

    manifest = {
        "kind": "age-explorer toy model",
        "recipe": asdict(cfg),
        "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                       "classifier": sum(p.numel() for p in classifier.parameters())},
        "latent": "pixel_unshuffle(2) of 32x32 RGB in [-1, 1] -> 16x16x12",
        "sampling_defaults": {"scheduler": "DDIM", "steps": 10, "guidance_scale": 3.0, "eta": 1.0},
        "versions": environment_versions(),
    }

    if previous:
        manifest["continued_from"] = {"folder": str(cfg.init_from), "trained_steps": previous.get("trained_steps"),
                                      "recipe": previous.get("recipe"), "train_seconds": previous.get("train_seconds")}
    earlier_steps = int(previous.get("trained_steps", 0)) if previous else 0
    earlier_seconds = float(previous.get("train_seconds", 0)) if previous else 0.0

    def snapshot(step: int) -> None:
        manifest.update(revision=weights_revision(ema_unet, ema_text), trained_steps=earlier_steps + step,
                        train_seconds=round(earlier_seconds + time.time() - started, 1))
        save_model_folder(out, ema_unet, ema_text, tokenizer, scheduler, classifier, Path(concepts_json), manifest)

    unet.train()
    text_encoder.train()
    bar = tqdm(range(cfg.steps), desc="toy model", disable=not progress)
    for step in bar:
        idx = torch.randint(cfg.pool_size, (cfg.batch_size,), generator=gen)
        images = pool[idx]
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        images[flip] = images[flip].flip(-1)
        x0 = images_to_latents(images)
        rows = _draw_caption_rows(world, pool_labels[idx], index, gen)
        states = text_encoder(caption_ids[rows]).last_hidden_state
        t = torch.randint(scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = add_noise(x0, noise, a)
        target = noise if cfg.prediction_type == "epsilon" else v_target(x0, noise, a)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=states).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, p in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(p, 1 - cfg.ema_decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.snapshot_every == 0 and step + 1 < cfg.steps:
            snapshot(step + 1)
    snapshot(cfg.steps)
    return out

"""CA against its reference: the same loss, gradients and AdamW update from the reference's own training lines.

The reference (``diffusers/train.py`` of nupurkmr9/concept-ablation) keeps its loss inline in ``main()``'s
training loop, so this script reads that loop's ``with accelerator.accumulate(...)`` block and the lines
that build its optimizer from a local copy with ``ast`` and executes them on the same tensors as this
project's CA runner. The reference's own ``create_custom_diffusion`` (trainable weights and its
Custom Diffusion attention processor) and ``parse_args`` (its defaults) are imported from the copy;
its unused data helpers (``utils.py``: openai, torchvision) are stubbed. Stand-ins: the VAE returns
the given latents (scaling 1), the text encoder looks prompt states up by id, ``torch.randn_like`` and
``torch.randint`` return the shared draws, the accelerator's ``backward`` records the gradients.
Both sides run two steps (the second checks the anchor prediction of the updated model), on copies
of the same UNet. Nothing of the reference is copied into the project.

    git clone https://github.com/nupurkmr9/concept-ablation ref-ca
    python scripts/fidelity_ca.py --reference ref-ca [--model toy] [--model tiny-sd]
"""

from __future__ import annotations

import argparse
import ast
import copy
import itertools
import sys
import tempfile
import types
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F

REFERENCE_FILE = "diffusers/train.py"
# (loss_type_reverse, with_prior_preservation, parameter_group) of the reference -> this project's options
CASES = [
    ("model-based", False, "cross-attn"),
    ("model-based", True, "cross-attn"),
    ("noise-based", False, "cross-attn"),
    ("noise-based", True, "cross-attn"),
    ("model-based", False, "full-weight"),
]
GROUPS = {"cross-attn": "xattn_kv", "full-weight": "full"}


def reference_sources(path: Path) -> tuple[str, str]:
    """The training step (the body of ``with accelerator.accumulate(...)``) and the optimizer's
    construction (the ``params_to_optimize`` branch and ``optimizer = optimizer_class(...)``) of ``main()``."""
    tree = ast.parse(path.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    block = next(n for n in ast.walk(main) if isinstance(n, ast.With)
                 and "accelerator.accumulate" in ast.unparse(n.items[0].context_expr))
    params = next(n for n in main.body if isinstance(n, ast.If) and "params_to_optimize" in ast.unparse(n)
                  and ast.unparse(n.test) == "args.parameter_group == 'embedding'")
    optimizer = next(n for n in main.body if isinstance(n, ast.Assign)
                     and ast.unparse(n.targets[0]) == "optimizer")
    return "\n".join(ast.unparse(s) for s in block.body), ast.unparse(params) + "\n" + ast.unparse(optimizer)


def import_reference(root: Path) -> types.ModuleType:
    """The reference's ``train`` module, with its data helpers stubbed (they need openai and torchvision)."""
    sys.path.insert(0, str(root / "diffusers"))
    stub = types.ModuleType("utils")
    for name in ("CustomDiffusionDataset", "PromptDataset", "collate_fn", "filter", "getanchorprompts"):
        setattr(stub, name, None)
    sys.modules["utils"] = stub
    from diffusers import StableDiffusionPipeline  # noqa: F401  (loads transformers' lazy names first)
    import transformers

    if not hasattr(transformers, "CLIPFeatureExtractor"):  # removed in transformers 5; only imported there
        transformers.CLIPFeatureExtractor = type("CLIPFeatureExtractor", (), {})
    import train  # the reference's diffusers/train.py

    return train


class TorchDraws:
    """``torch`` as the reference's step sees it: its noise and timestep draws are the shared ones."""

    def __init__(self, noise: torch.Tensor, t: torch.Tensor):
        self.randn_like = lambda x: noise.clone()
        self.randint = lambda *args, **kwargs: t.clone()

    def __getattr__(self, name):
        return getattr(torch, name)


class Accelerator:
    sync_gradients = True
    num_processes = 1

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params, self.grads = params, {}

    def backward(self, loss):
        loss.backward()
        self.grads = {n: p.grad.detach().clone() for n, p in self.params.items() if p.grad is not None}

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


class VAE:
    config = types.SimpleNamespace(scaling_factor=1.0)

    def encode(self, x):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda: x))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def max_rel(ours: dict, ref: dict) -> float:
    """Largest |ours - ref| over all tensors, relative to the largest |ref| over all tensors (a tensor whose
    gradient is zero in exact arithmetic, such as a bias before a group norm, holds float noise only)."""
    assert set(ours) == set(ref), (sorted(set(ours) ^ set(ref)))[:5]
    scale = max(r.abs().max().item() for r in ref.values())
    return max((ours[n] - ref[n]).abs().max().item() for n in ref) / scale


def run_case(train, step_source: str, optimizer_source: str, bundle, loss_type: str, prior: bool, group: str,
             steps: int = 2, b: int = 2, seed: int = 0, **ours) -> dict[str, list[float]]:
    """Relative differences per quantity (loss, gradients, update), one per step, of ``steps`` steps of
    one reference configuration; ``ours`` changes this project's side only (the controls)."""
    from age_explorer.core.erasure import make_config
    from age_explorer.core.erasure.ca import CARun, install_start_token_detach

    flags = ["--pretrained_model_name_or_path", "unused", "--concept_type", "object", "--caption_target", "a+b",
             "--loss_type_reverse", loss_type, "--parameter_group", group]
    if prior:
        flags += ["--with_prior_preservation", "--class_data_dir", "unused", "--class_prompt", "unused"]
    args = train.parse_args(flags)
    ref_unet = train.create_custom_diffusion(copy.deepcopy(bundle.unet), group)  # before ours trains anything
    ref_params = {n: p for n, p in ref_unet.named_parameters() if p.requires_grad}
    config = make_config("ca", None, concepts=["red circle"], anchor="blue square", prompt_template="a {c}",
                         loss_type=loss_type, prior_preservation=prior, parameter_set=GROUPS[group],
                         lr=args.learning_rate, weight_decay=args.adam_weight_decay, max_grad_norm=args.max_grad_norm,
                         prior_loss_weight=args.prior_loss_weight, batch_size=b, iterations=steps, anchor_images=b,
                         **ours)
    namespace = dict(args=args, unet=ref_unet, itertools=itertools, optimizer_class=torch.optim.AdamW,
                     text_encoder=None, modifier_token_id=[])
    exec(compile(optimizer_source, REFERENCE_FILE, "exec"), namespace)
    ref_optimizer = namespace["optimizer"]
    rows: dict[str, list[float]] = {"loss": [], "gradients": [], "update": []}
    with tempfile.TemporaryDirectory() as tmp:
        run = CARun(bundle, config, tmp)
        handles = install_start_token_detach(bundle.unet) if config.detach_start_token else []
        try:
            erased = bundle.encode(["a red circle"] * b)
            anchor = bundle.encode(["a blue square"] * b)
            table = torch.cat([erased, anchor])  # prompt ids: 0..b-1 erased, b..2b-1 anchor
            g = torch.Generator().manual_seed(seed)
            n = 2 * b if prior else b
            x0 = torch.randn((n, *bundle.latent_shape), generator=g)
            ids = torch.arange(b).tolist() + ([b + i for i in range(b)] if prior else [])
            for step in range(steps):
                noise = torch.randn(x0.shape, generator=g)
                t = torch.randint(len(run.alphas), (n,), generator=g)
                # the reference's step
                accelerator = Accelerator(ref_params)
                before_ref = {k: p.detach().clone() for k, p in ref_params.items()}
                scope = dict(torch=TorchDraws(noise, t), F=F, itertools=itertools, args=args, vae=VAE(),
                             weight_dtype=torch.float32, noise_scheduler=bundle.train_scheduler(),
                             text_encoder=lambda i: (table[i],), unet=ref_unet, accelerator=accelerator,
                             optimizer=ref_optimizer, lr_scheduler=types.SimpleNamespace(step=lambda: None),
                             batch={"pixel_values": x0, "input_ids": torch.tensor(ids),
                                    "input_anchor_ids": torch.arange(b, 2 * b),
                                    "mask": torch.ones(n, 1, *bundle.latent_shape[1:])},
                             tokenizer=None, modifier_token_id=[])
                exec(compile(step_source, REFERENCE_FILE, "exec"), scope)
                # this project's step on the same draws
                params = run.predictor.params
                before = {k: p.detach().clone() for k, p in params.items()}
                loss, _ = run.loss(x0, noise, t, erased, anchor, anchor if prior else None)
                run.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grads = {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
                rows["loss"].append(rel(loss.detach(), scope["loss"].detach()))
                rows["gradients"].append(max_rel(grads, accelerator.grads))
                # the optimizer on the reference's own gradients: clipping, AdamW and weight decay alone
                # (Adam divides each gradient by its own size, so float noise in near-zero gradients would
                # show as whole-lr differences), which also starts the next step from the same weights
                for k, p in params.items():
                    p.grad = accelerator.grads[k].clone() if k in accelerator.grads else None
                run.clip_and_step()
                update = {k: params[k].detach() - before[k] for k in params}
                ref_update = {k: ref_params[k].detach() - before_ref[k] for k in ref_params}
                rows["update"].append(max(rel(update[k], ref_update[k]) for k in ref_update))
        finally:
            for handle in handles:
                handle.remove()
            run.predictor.restore()
    return rows


def cells(rows: dict[str, list[float]]) -> str:
    """'step 1 / step 2' of each quantity."""
    return " | ".join(" / ".join(f"{v:.1e}" for v in rows[q]) for q in ("loss", "gradients", "update"))


def check_defaults(train) -> list[tuple[str, object, object]]:
    """The reference's argparse defaults next to CAConfig's (what differs is listed, with why in the docs)."""
    from age_explorer.core.erasure.config import CAConfig

    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--concept_type", "object", "--caption_target", "x"])
    ours = {f.name: f.default for f in fields(CAConfig)}
    pairs = [("learning_rate", "lr"), ("train_batch_size", "batch_size"), ("adam_weight_decay", "weight_decay"),
             ("max_grad_norm", "max_grad_norm"), ("loss_type_reverse", "loss_type"),
             ("with_prior_preservation", "prior_preservation"), ("prior_loss_weight", "prior_loss_weight"),
             ("num_class_images", "anchor_images"), ("hflip", "hflip"), ("parameter_group", "parameter_set")]
    return [(r, getattr(args, r), ours[o]) for r, o in pairs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a local copy of nupurkmr9/concept-ablation")
    parser.add_argument("--model", action="append", help="toy (v prediction) and/or tiny-sd (a random epsilon "
                        "SD-1.x pipeline); default both")
    args = parser.parse_args(argv)
    root = Path(args.reference)
    step_source, optimizer_source = reference_sources(root / REFERENCE_FILE)
    train = import_reference(root)
    torch.manual_seed(0)
    from age_explorer.core.bundle import load_bundle

    worst = 0.0
    for model in args.model or ["toy", "tiny-sd"]:
        if model == "tiny-sd":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.tiny_models import build_tiny_pipeline

            work = Path(tempfile.mkdtemp())
            build_tiny_pipeline(work).save_pretrained(work / "pipeline")
            bundle = load_bundle(str(work / "pipeline"), device="cpu")
        else:
            bundle = load_bundle(model, device="cpu")
        print(f"\n{model} ({bundle.prediction_type} prediction): max relative difference, step 1 / step 2\n")
        print("| case (reference flags) | loss | gradients | clipped AdamW update |")
        print("|---|---|---|---|")
        for loss_type, prior, group in CASES:
            case = f"{loss_type}{', --with_prior_preservation' if prior else ''}, {group}"
            # on a v model the reference's model-based prior target is the noise (its code takes `noise` whatever
            # the prediction type); this project's is the velocity, what a v model is trained to output
            expected = prior and loss_type == "model-based" and bundle.prediction_type == "v_prediction"
            if expected:
                case += " (prior target: reference noise, here velocity)"
            rows = run_case(train, step_source, optimizer_source, bundle, loss_type, prior, group)
            worst = worst if expected else max([worst] + [v for values in rows.values() for v in values])
            print(f"| {case} | {cells(rows)} |")
        # controls: this project's side changed on purpose, so the check must see a difference
        for label, options in (("control: detach_start_token=False", {"detach_start_token": False}),
                               ("control: anchor_prediction='frozen'", {"anchor_prediction": "frozen"})):
            rows = run_case(train, step_source, optimizer_source, bundle, "model-based", False, "cross-attn", **options)
            print(f"| {label} | {cells(rows)} |")
    print("\ndefaults: the reference's argparse vs CAConfig\n")
    print("| reference flag | reference | CAConfig |")
    print("|---|---|---|")
    for flag, theirs, ours in check_defaults(train):
        print(f"| --{flag} | {theirs} | {ours} |")
    print("\nloss: |ours - reference| / |reference|; gradients: the largest |ours - reference| over all trained tensors "
          "/ the largest |reference|; update: the clipped AdamW step from the reference's gradients, per element")
    print(f"largest relative difference (controls and the v-model prior target aside): {worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""MACE against its reference: the same refinement, attention loss and gradients, and fusion.

The reference (Shilin-LU/MACE) keeps its maths in ``src/cfr_utils.py`` and ``src/mace_lora_atten_processor.py``,
both imported here from a local copy; nothing of it is copied into the project:

- stage 1 (CFR): ``get_ca_layers``, ``prepare_k_v`` (``all_words=False``) and ``closed_form_refinement``,
  called in ``cfr_lora_training.main``'s order, with the preserved prompts' cache made as ``cache_coco.py``
  makes it (``prepare_k_v(all_words=True)`` then ``closed_form_refinement(cache_mode=True)``) and combined as
  ``main`` combines it (``train_preserve_scale * cache``, then ``preserve_scale=train_preserve_scale``);
- stage 2 (the loss): the reference's ``LoRAAttnProcessor`` is set on every attention layer by the loop of
  ``cfr_lora_training.main`` (read with ``ast`` and executed), its ``AttnProcessor`` records the
  probabilities into the reference's ``AttnController`` (object masks on), whose ``loss()`` is compared
  with this project's, and so are the gradients of every to_k / to_v LoRA. Adaptation: diffusers 0.42's
  attention layers are plain ``nn.Linear``; the reference calls them with ``scale=``, so they are swapped
  for diffusers' own ``LoRACompatibleLinear`` (same weights) on the reference's copy. The LoRA ups are
  drawn at random (the reference starts them at zero, where the downs get no gradient);
- stage 3 (fusion): ``fuse_lora_close_form.main``'s calls: per concept ``prepare_k_v(all_words=True,
  prepare_k_v_for_lora=True)`` on the refined model with the LoRA fused (diffusers' ``fuse_lora(lora_scale=1)``:
  W + B A), then ``closed_form_refinement(preserve_scale=fuse_preserve_scale)`` with the preserved cache;
- the prompts: ``prompt_augmentation`` (the 30 object templates) gives both sides' prompts; the concept
  token positions come from ``MACEDataset.__getitem__``'s lines (read with ``ast``), the timestep weights
  from ``importance_sampling_fn``.

Both sides run on the same tiny random SD-1.x pipeline with CLIP's 77-token length (the reference
hard-codes 77), the reference on float64 copies with ``torch``'s default dtype float64. This project runs
once with the pipeline in float64 (the maths) and once as it runs by default (float32 weights, float64 solves).

    git clone https://github.com/Shilin-LU/MACE ref-mace
    python scripts/fidelity_mace.py --reference ref-mace
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import io
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

MAPPING = "ground"
# (name, concepts, MACE options)
CASES = [
    ("configs/object/erase_ship.yaml: lambda 1e3", ["red circle"], dict(lam=1e3)),
    ("two concepts, preserved prompts, lambda 10", ["red circle", "blue ring"],
     dict(lam=10.0, preserve=["a dog", "a tree in a field"], train_preserve_scale=0.5, fuse_preserve_scale=0.3)),
    ("configs/celebrity: lambda 0, preserve scales 1e-4", ["red circle"],
     dict(lam=0.0, preserve=["a dog"], train_preserve_scale=1e-4, fuse_preserve_scale=1e-4)),
]


# ---- the reference -------------------------------------------------------------------------------------
def import_reference(root: Path) -> SimpleNamespace:
    sys.path.insert(0, str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfr = importlib.import_module("src.cfr_utils")
        processors = importlib.import_module("src.mace_lora_atten_processor")
    training = ast.parse((root / "src" / "cfr_lora_training.py").read_text())
    main = next(n for n in training.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    per_concept = next(n for n in main.body if isinstance(n, ast.For) and "_concept_num" in ast.unparse(n.iter))
    set_processors = next(n for n in per_concept.body
                          if isinstance(n, ast.For) and ast.unparse(n.iter) == "unet.named_modules()")
    dataset = ast.parse((root / "src" / "dataset.py").read_text())
    item = next(n for c in dataset.body if isinstance(c, ast.ClassDef) and c.name == "MACEDataset"
                for n in c.body if isinstance(n, ast.FunctionDef) and n.name == "__getitem__")
    wanted = {"prompt_ids", "concept_ids", "pooler_token_id", "concept_positions"}
    positions = [s for s in item.body
                 if (isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) in wanted)
                 or (isinstance(s, ast.For) and "prompt_ids" in ast.unparse(s.iter))]
    return SimpleNamespace(
        cfr=cfr, LoRAAttnProcessor=processors.LoRAAttnProcessor, root=root,
        set_processors=compile(ast.Module([set_processors], []), "cfr_lora_training.py", "exec"),
        positions=compile(ast.Module(positions, []), "dataset.py", "exec"))


@contextlib.contextmanager
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def kv(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters()
            if ("attn2.to_k." in n or "attn2.to_v." in n) and n.endswith("weight")}


def reference_positions(ref, tokenizer, prompt: str, concept: str) -> torch.Tensor:
    space = {"self": SimpleNamespace(tokenizer=tokenizer, use_pooler=True), "instance_prompt": prompt,
             "target_tokens": concept, "torch": torch}
    exec(ref.positions, space)
    return torch.tensor(space["concept_positions"]).bool()


def reference_cache(ref, unet, text_encoder, tokenizer, preserve: list[str], layers: int) -> dict:
    """cache_coco.py's cache of the preserved prompts (0.0 per key without them, as cfr_lora_training.main)."""
    cfr = ref.cfr
    if not preserve:
        return {f"{l}_for_{m}": 0.0 for l in range(layers) for m in ("mat1", "mat2")}
    cache = {f"{l}_for_{m}": None for l in range(layers) for m in ("mat1", "mat2")}
    proj, ca, og = cfr.get_ca_layers(unet, with_to_k=True)
    entry = {"old": [[p] for p in preserve], "new": [[p] for p in preserve]}
    contexts, values = cfr.prepare_k_v(text_encoder, proj, ca, og, [entry], tokenizer, all_words=True)
    cfr.closed_form_refinement(proj, contexts, values, cache_dict=cache, cache_mode=True)
    return cache


def run_reference(ref, bundle, concepts, options, loras, probe_inputs):
    """Stage 1, the loss and its gradients of each concept's LoRA on the refined model, stage 3."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.lora import LoRACompatibleLinear

    cfr, tokenizer = ref.cfr, bundle.tokenizer
    lam, tps, fps = options["lam"], options.get("train_preserve_scale", 0.0), options.get("fuse_preserve_scale", 0.0)
    preserve = options.get("preserve", [])
    out = {}
    with float64_default():
        unet, text_encoder = copy.deepcopy(bundle.unet).double(), copy.deepcopy(bundle.text_encoder).double()
        entries = [{"old": cfr.prompt_augmentation(c, augment=True, concept_type="object"),
                    "new": cfr.prompt_augmentation(MAPPING, augment=True, concept_type="object")} for c in concepts]
        # stage 1, in cfr_lora_training.main's order
        proj, ca, og = cfr.get_ca_layers(unet, with_to_k=True)
        contexts, values = cfr.prepare_k_v(text_encoder, proj, ca, og, entries, tokenizer, all_words=False)
        prior = reference_cache(ref, copy.deepcopy(bundle.unet).double(), text_encoder, tokenizer, preserve, len(proj))
        cache = {key: tps * prior[key] + 0.0 for key in prior}  # + the CFR_dict's 0.0
        proj, _, _ = cfr.get_ca_layers(unet, with_to_k=True)
        cfr.closed_form_refinement(proj, contexts, values, lamb=lam, preserve_scale=tps, cache_dict=cache)
        out["refined"] = kv(unet)
        # stage 2: the loss and gradients of each concept's LoRA (the reference's processors and controller)
        out["loss"], out["grads"] = {}, {}
        for concept in concepts:
            model = copy.deepcopy(unet)
            for module in model.modules():
                if isinstance(module, Attention):
                    for owner, key in ((module, "to_q"), (module, "to_k"), (module, "to_v"), (module.to_out, "0")):
                        old = owner._modules[key]
                        new = LoRACompatibleLinear(old.in_features, old.out_features, bias=old.bias is not None)
                        new.load_state_dict(old.state_dict())
                        owner._modules[key] = new
            controller = cfr.AttnController()
            args = SimpleNamespace(rank=options.get("rank", 1), with_prior_preservation=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(ref.set_processors, {"unet": model, "LoRAAttnProcessor": ref.LoRAAttnProcessor, "args": args,
                                          "attn_controller": controller})
            lora_params = {}
            for key, proc in model.attn_processors.items():
                if key.endswith("attn2.processor"):
                    base = key[: -len("processor")]
                    for which, layer in (("to_k", proc.to_k_lora), ("to_v", proc.to_v_lora)):
                        up, down = loras[concept][f"{base}{which}.weight"]
                        with torch.no_grad():
                            layer.up.weight.copy_(up)
                            layer.down.weight.copy_(down)
                        lora_params[f"{base}{which}.weight"] = (layer.up.weight, layer.down.weight)
            noisy, t, prompt, mask = probe_inputs[concept]
            ids = tokenizer(prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids
            states = text_encoder(ids)[0]
            controller.set_concept_positions(reference_positions(ref, tokenizer, prompt, concept)[None], mask.double(),
                                             use_gsam_mask=True)
            model(noisy.double(), t, states).sample
            loss = controller.loss()
            loss.backward()
            out["loss"][concept] = loss.detach()
            out["grads"][concept] = {n: (grad(up), grad(down)) for n, (up, down) in lora_params.items()}
        # stage 3, fuse_lora_close_form.main's calls
        all_contexts, all_values = [], []
        for concept, entry in zip(concepts, entries):
            fused = copy.deepcopy(unet)
            params = dict(fused.named_parameters())
            with torch.no_grad():
                for name, (up, down) in loras[concept].items():
                    params[name].add_(up.double() @ down.double())  # diffusers' fuse_lora(lora_scale=1.0)
            proj_l, ca_l, og_l = cfr.get_ca_layers(fused, with_to_k=True)
            c, v = cfr.prepare_k_v(text_encoder, proj_l, ca_l, og_l, [entry], tokenizer, all_words=True,
                                   prepare_k_v_for_lora=True)
            all_contexts.append(c[0])
            all_values.append(v[0])
        final, _, _ = cfr.get_ca_layers(unet, with_to_k=True)
        cache = {key: prior[key] + 0.0 * 0.0 for key in prior}  # prior + preserve_weight * domain (none)
        cfr.closed_form_refinement(final, all_contexts, all_values, lamb=lam, preserve_scale=fps, cache_dict=cache)
        out["fused"] = kv(unet)
        out["templates"] = [p.replace(concepts[0], "{c}") for p, _ in entries[0]["old"]]
        out["prompts"] = {c: [p for p, _ in e["old"]] for c, e in zip(concepts, entries)}
    return out


# ---- this project ------------------------------------------------------------------------------------------
def run_ours(bundle, config, loras, probe_inputs):
    from age_explorer.core.erasure import mace

    params = dict(bundle.unet.named_parameters())
    names = mace.projection_names(bundle.unet)
    originals = {n: params[n].detach().clone() for n in names}
    w0 = {n: originals[n].double() for n in names}
    biases = {n: None for n in names}
    preserved = mace.all_position_sums(bundle, list(config.preserve)) if config.preserve else None
    refined = mace.refine(bundle, config, w0, biases, preserved)
    out = {"refined": refined, "loss": {}, "grads": {}}
    base = {n: refined[n].to(bundle.dtype) for n in names}
    probe = mace.AttentionProbe(bundle.unet, tuple(bundle.latent_shape[-2:]))
    for p in bundle.unet.parameters():
        p.requires_grad_(False)
    for concept in config.concepts:
        lora = {n: (up.to(bundle.dtype).clone().requires_grad_(True),
                    down.to(bundle.dtype).clone().requires_grad_(True))
                for n, (up, down) in loras[concept].items()}
        noisy, t, prompt, mask = probe_inputs[concept]
        positions = mace.concept_positions(bundle, prompt, concept, True)
        loss = mace.attention_loss(bundle, probe, mace.lora_weights(base, lora), noisy.to(bundle.dtype), t,
                                   bundle.encode([prompt]), positions, mask.to(bundle.dtype))
        loss.backward()
        out["loss"][concept] = loss.detach()
        out["grads"][concept] = {n: (grad(up), grad(down)) for n, (up, down) in lora.items()}
    deltas = {c: {n: up.double() @ down.double() for n, (up, down) in loras[c].items()} for c in config.concepts}
    out["fused"] = mace.fuse(bundle, config, refined, deltas, w0, biases, preserved)
    return out


def grad(p: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient; zeros where the loss does not reach it (the last layer's value LoRA)."""
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (0 when both are zero)."""
    diff, size = float((a.double() - b.double()).norm()), float(b.double().norm())
    return 0.0 if diff == 0 else diff / size


def max_rel(ours: dict, theirs: dict) -> float:
    return max(rel(ours[n], theirs[n]) for n in theirs)


def build_pipeline(work: Path):
    """tests/tiny_models.py's pipeline with CLIP's 77 tokens, and cross-attention at two resolutions and in
    the mid block."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from age_explorer.core.app.random_pipelines import byte_level_tokenizer

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer(work / "tokenizer_src", max_length=77,
                                     merges=("r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():  # a trained CLIP's last layer norm has a bias: without one the states span d - 1 dimensions
        norm = text_encoder.get_submodule("final_layer_norm")
        norm.weight.add_(0.2 * torch.randn_like(norm.weight))
        norm.bias.copy_(0.5 * torch.randn_like(norm.bias))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(work / "pipeline")
    return work / "pipeline"


def inputs(bundle, concepts, prompts, seed=0):
    """Per concept: the LoRAs (down as the reference initialises them, up at random), a noised latent,
    a timestep, one of its prompts and an object mask."""
    from age_explorer.core.erasure import mace

    g = torch.Generator().manual_seed(seed)
    params = dict(bundle.unet.named_parameters())
    loras, probe = {}, {}
    for k, concept in enumerate(concepts):
        loras[concept] = {n: (0.1 * torch.randn(params[n].shape[0], 1, generator=g, dtype=torch.float64),
                              torch.randn(1, params[n].shape[1], generator=g, dtype=torch.float64))
                          for n in mace.projection_names(bundle.unet)}
        mask = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
        mask[..., 4 + 4 * k:24, 8:28 - 4 * k] = 1
        probe[concept] = (torch.randn(1, *bundle.latent_shape, generator=g, dtype=torch.float64),
                          torch.tensor([300 + 50 * k]), prompts[concept][3 + k], mask)
    return loras, probe


def check_defaults(root: Path) -> list[tuple[str, object, object]]:
    import yaml

    from age_explorer.core.erasure import make_config

    recipe = yaml.safe_load((root / "configs" / "object" / "erase_ship.yaml").read_text())["MACE"]
    ours = make_config("mace", "mace", concepts=["ship"])
    pairs = [("lamb", "lam"), ("max_train_steps", "iterations"), ("learning_rate", "lr"), ("rank", "rank"),
             ("train_preserve_scale", "train_preserve_scale"), ("fuse_preserve_scale", "fuse_preserve_scale"),
             ("use_pooler", "use_pooler"), ("importance_sampling", "importance_sampling"),
             ("use_gsam_mask", "use_masks"), ("adam_weight_decay", "weight_decay"), ("max_grad_norm", "max_grad_norm")]
    rows = [(key, recipe[key], getattr(ours, field)) for key, field in pairs]
    rows.append(("mapping_concept", recipe["mapping_concept"], ours.target))
    rows.append(("train_batch_size", recipe["train_batch_size"], "1 (the only one)"))
    rows.append(("images per concept (inference.py)", 8, ours.num_images))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path, help="a local copy of Shilin-LU/MACE")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from age_explorer.core.bundle import load_bundle
    from age_explorer.core.erasure import make_config
    from age_explorer.core.erasure.mace import concept_positions, importance_weights

    ref = import_reference(args.reference.resolve())
    folder = build_pipeline(Path(tempfile.mkdtemp(prefix="fidelity_mace_")))
    worst = 0.0
    print("| case | quantity | max relative difference, float64 | ours in float32 |")
    print("|---|---|---|---|")
    for name, concepts, options in CASES:
        bundle = load_bundle(str(folder), device="cpu")
        prompts = {c: [p for p, _ in ref.cfr.prompt_augmentation(c, augment=True, concept_type="object")]
                   for c in concepts}
        loras, probe = inputs(bundle, concepts, prompts)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # tqdm
            theirs = run_reference(ref, bundle, concepts, options, loras, probe)
        config = make_config("mace", None, concepts=concepts, target=MAPPING, templates=theirs["templates"],
                             requires_gpu=False, **options)
        assert all(config.prompts(c) == theirs["prompts"][c] for c in concepts)
        assert config.prompts(MAPPING) == [p for p, _ in ref.cfr.prompt_augmentation(MAPPING, concept_type="object")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours32 = run_ours(bundle, config, loras, probe)
            bundle.unet.double()
            bundle.text_encoder.double()
            bundle.dtype = torch.float64
            ours64 = run_ours(bundle, config, loras, probe)
        rows = [("stage 1 (CFR): refined k/v weights", lambda o: max_rel(o["refined"], theirs["refined"]))]
        for c in concepts:
            rows.append((f"stage 2 ({c}): attention loss", lambda o, c=c: rel(o["loss"][c], theirs["loss"][c])))
            rows.append((f"stage 2 ({c}): LoRA gradients (up and down)", lambda o, c=c: max(
                max(rel(o["grads"][c][n][i], theirs["grads"][c][n][i]) for i in (0, 1)) for n in theirs["grads"][c])))
        rows.append(("stage 3 (fusion): fused k/v weights", lambda o: max_rel(o["fused"], theirs["fused"])))
        for quantity, measure in rows:
            a, b = measure(ours64), measure(ours32)
            worst = max(worst, a)
            print(f"| {name} | {quantity} | {a:.2e} | {b:.2e} |")
    # the token positions the loss reads, on every prompt, and the timestep weights
    bundle = load_bundle(str(folder), device="cpu")
    same = total = 0
    for concept in ("red circle", "blue ring", "ship"):
        for prompt, _ in ref.cfr.prompt_augmentation(concept, augment=True, concept_type="object"):
            total += 1
            same += torch.equal(concept_positions(bundle, prompt, concept, True),
                                reference_positions(ref, bundle.tokenizer, prompt, concept))
    print(f"| all | concept token positions (MACEDataset.__getitem__): prompts identical | {same}/{total} | |")
    t = torch.arange(1000)
    theirs_w = torch.tensor([ref.cfr.importance_sampling_fn(x) for x in t.tolist()], dtype=torch.float64)
    w_rel = rel(importance_weights(1000), theirs_w)
    worst = max(worst, w_rel)
    print(f"| all | importance sampling weights f(t), t = 0..999 | {w_rel:.2e} | |")
    print("\n| configs/object/erase_ship.yaml | reference | preset mace |")
    print("|---|---|---|")
    for key, theirs_value, ours_value in check_defaults(args.reference):
        print(f"| {key} | {theirs_value!r} | {ours_value!r} |")
    print(f"\nlargest relative difference (float64): {worst:.2e}")
    return 0 if worst < 1e-8 and same == total else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Check the exports with the tools' own loader code: ComfyUI's LoRA and checkpoint loaders, and
AUTOMATIC1111's UNet class, read from local copies (their code stays out of this project).

    python scripts/check_exports_in_tools.py COMFYUI_DIR A1111_DIR [--models sd1 sdxl]

COMFYUI_DIR is a ComfyUI checkout (``Comfy-Org/ComfyUI``). A1111_DIR is a stable-diffusion-webui
checkout with the repositories its installer clones (``repositories/stable-diffusion-stability-ai``
for SD-1.x/2.x, ``repositories/generative-models`` for SDXL); its UNet classes come from those.

On a UNet of the real size with random weights (SD-1.4's config, or SDXL 1.0's) plus a VAE and text
encoder(s) of the real sizes, also random:

1. the base is written as a single-file checkpoint with the project's key map
   (``core/export_checkpoint.py``), and ComfyUI's ``load_checkpoint_guess_config`` loads it: the model
   type it detects, and its missing / unexpected key lines;
2. an "erased" model: a rank-4 change of every Linear and Conv weight of the chosen set (``xattn``: the
   cross-attention layers; ``full``: the whole UNet) and a random change of its biases and norms. The
   project's LoRA code (``core/export_lora.py``, rank 8, so the weights are exactly representable)
   writes the kohya file, ComfyUI's ``load_lora_for_models`` + ``patch_model`` apply it to the base,
   and every UNet tensor is compared with the erased model's (in ComfyUI's own diffusers-to-LDM map,
   ``comfy.utils.unet_to_diffusers``): the keys recognised and ignored, the max difference of the
   changed weights, the changed biases and what no LoRA holds (norms);
3. the erased model's single file: the type ComfyUI detects and the max difference of its UNet from
   the erased one; then AUTOMATIC1111's UNet class (``ldm``/``sgm`` ``UNetModel`` built from the config
   A1111 uses for that model) loads its ``model.diffusion_model.*`` part: missing and unexpected keys.

Stubbed, because they are unrelated to loading and not installed here: ``torchvision``,
``torchaudio``, ``av``, ``spandrel``, ``kornia`` and ``aiohttp`` (ComfyUI imports them for image
models, audio, video, upscalers and its server), ``open_clip`` and ``pytorch_lightning`` (``sgm``
imports them for its text encoders and training). Nothing of the loaders is stubbed. Their other
dependencies (einops, torchsde, sentencepiece, omegaconf) must be importable, e.g. from a folder on
PYTHONPATH.
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import logging
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

from age_explorer.core.app.bench import SD14_UNET
from age_explorer.core.app.random_pipelines import SD_VAE, SDXL_UNET

STUBBED = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
           "torchvision.utils", "torchaudio", "av", "spandrel", "kornia", "aiohttp", "open_clip", "pytorch_lightning",
           "pytorch_lightning.utilities", "pytorch_lightning.utilities.distributed"]
LORA_RANK, CHANGE_RANK = 8, 4


class _Stub(types.ModuleType):
    """An importable module whose every attribute is another stub, or an empty class for a capitalised name
    (for module-level subclasses such as ``pl.LightningModule``); never called while loading."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            return type(name, (), {})
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return _Stub("call")


def import_comfyui(folder: Path):
    # diffusers and transformers first: they look for torchvision themselves and must not find the stub
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import (ByT5Tokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,  # noqa: F401
                              T5EncoderModel, T5Tokenizer)

    import age_explorer.core.export_checkpoint  # noqa: F401
    import age_explorer.core.export_lora  # noqa: F401

    for name in STUBBED:
        if name not in sys.modules:
            sys.modules[name] = _Stub(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.path.insert(0, str(folder))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora  # noqa: F401
    import comfy.sd
    import comfy.utils
    import comfyui_version

    sys.argv = argv
    return comfy, comfyui_version.__version__


class LogLines(logging.Handler):
    """The log lines the tools write while loading (their only report of ignored keys)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def take(self, *starts: str) -> list[str]:
        found = [line for line in self.lines if line.startswith(starts)]
        self.lines.clear()
        return found


def random_model(kind: str, dtype: torch.dtype) -> SimpleNamespace:
    """A bundle-like object of the real sizes with random weights (what the key map reads)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768)
    model = SimpleNamespace(unet=UNet2DConditionModel(**(SDXL_UNET if kind == "sdxl" else SD14_UNET)).to(dtype),
                            vae=AutoencoderKL(**SD_VAE).to(dtype), text_encoder=CLIPTextModel(clip_l).to(dtype),
                            backend=SimpleNamespace(name="stable-diffusion-xl" if kind == "sdxl" else "stable-diffusion"))
    if kind == "sdxl":
        model.backend.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu")).to(dtype)
    return model


def changed_names(unet, which: str) -> list[str]:
    from age_explorer.core.erasure.params import select_parameters

    return list(select_parameters(unet, which) if which == "xattn" else dict(unet.named_parameters()))


def change(name: str, value: torch.Tensor) -> torch.Tensor:
    """The erasure's change of one tensor, the same at every call: rank 4 for a matrix or kernel, random
    for a vector (bias, norm)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    scale = 0.02
    if value.dim() >= 2:
        out, inner = value.shape[0], value[0].numel()
        left = torch.randn(out, CHANGE_RANK, generator=generator) * scale
        right = torch.randn(CHANGE_RANK, inner, generator=generator)
        return (left @ right).reshape(value.shape)
    return torch.randn(value.shape, generator=generator) * scale


class Erased(dict):
    """Erased values by parameter name, computed when asked for (the base UNet is not copied)."""

    def __init__(self, unet, names):
        super().__init__()
        self._params = dict(unet.named_parameters())
        self._names = names

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def __contains__(self, name):
        return name in self._names

    def __getitem__(self, name):
        value = self._params[name].detach()
        return (value.float() + change(name, value)).to(value.dtype)


def comfy_unet_map(model_patcher, comfy) -> dict[str, str]:
    """ComfyUI's own diffusers -> LDM UNet names for the loaded model."""
    return comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)


def compare_unet(comfy, patcher, unet, names: set[str]) -> dict:
    """Max |ComfyUI's tensor - ours| over the changed weights, changed biases, changed other tensors and
    the unchanged ones, in ComfyUI's own name map."""
    mapping = comfy_unet_map(patcher, comfy)
    theirs = patcher.model.diffusion_model.state_dict()
    groups = {"changed weights": 0.0, "changed biases": 0.0, "changed other (norms)": 0.0, "unchanged": 0.0}
    unmapped = 0
    for name, value in unet.state_dict().items():
        ldm = mapping.get(name)
        if ldm is None or ldm not in theirs:
            unmapped += 1
            continue
        diff = float((theirs[ldm].float() - value.float()).abs().max())
        module = unet.get_submodule(name.rpartition(".")[0])
        if name not in names:
            group = "unchanged"
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            group = "changed weights" if name.endswith(".weight") else "changed biases"
        else:
            group = "changed other (norms)"
        groups[group] = max(groups[group], diff)
    return {**groups, "unmapped": unmapped}


def check_model(kind: str, comfy, a1111: Path | None, work: Path, report) -> None:
    from safetensors.torch import save_file

    from age_explorer.core.export_checkpoint import checkpoint_state_dict
    from age_explorer.core.export_lora import lowrank_delta

    dtype = torch.float16 if kind == "sdxl" else torch.float32  # SDXL in fp32 would need 3 x 10 GB here
    logs = LogLines()
    logging.getLogger().addHandler(logs)
    logging.getLogger().setLevel(logging.DEBUG)
    started = time.time()
    model = random_model(kind, dtype)
    base_file = work / f"{kind}-base.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint_state_dict(model).items()}, str(base_file))
    report(f"\n## {kind}: UNet {sum(p.numel() for p in model.unet.parameters()) / 1e6:.0f} M parameters, {dtype}")
    kinds = ("xattn", "full") if kind == "sd1" else ("xattn",)
    for which in kinds:
        logs.take()
        # the base is loaded for each delta: two models of ComfyUI's at once would not fit beside ours
        patcher, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(base_file), output_vae=True, output_clip=True)
        if which == kinds[0]:
            report(f"- ComfyUI, base single file: detected {type(patcher.model.model_config).__name__}; key warnings: "
                   f"{logs.take('unet missing', 'unet unexpected', 'clip missing', 'Missing VAE', 'left over') or 'none'}")
        names = changed_names(model.unet, which)
        with torch.no_grad():
            factors = lowrank_delta(model.unet, Erased(model.unet, names), LORA_RANK)
        kohya = factors.kohya_state_dict()
        lora = {k: v.to(dtype) if v.dim() else v for k, v in kohya.items()}
        logs.take()
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
        ignored = logs.take("lora key not loaded")
        if which == "xattn":  # the PEFT file, the one that is not for ComfyUI: what ComfyUI makes of it
            peft = {k: v.to(dtype) for k, v in factors.peft_state_dict().items()}
            peft_patched, _ = comfy.sd.load_lora_for_models(patcher, None, peft, 1.0, 0.0)
            peft_ignored = logs.take("lora key not loaded")
            report(f"- ComfyUI LoRA, PEFT file of the {which} delta: {len(peft)} keys, {len(peft) - len(peft_ignored)} "
                   f"recognised, {len(peft_ignored)} ignored (warnings only); {len(peft_patched.patches)} tensors patched")
            del peft_patched
        patched.patch_model()
        params = dict(model.unet.named_parameters())
        # the base values, to return to for the next delta (adding and subtracting a change would round)
        backup = {n: params[n].detach().clone() for n in names} if which != kinds[-1] else {}
        with torch.no_grad():  # our UNet becomes the erased one, to compare and to write as a single file
            for name in names:
                params[name].add_(change(name, params[name]).to(params[name].dtype))
        diffs = compare_unet(comfy, patched, model.unet, set(names))
        count = len(patched.patches)
        del patched, patcher
        gc.collect()
        report(f"- ComfyUI LoRA, {which} delta: {len(kohya)} kohya keys, {count} tensors patched "
               f"({sum(k.endswith('.diff_b') for k in kohya)} diff_b), {len(kohya) - len(ignored)} recognised, "
               f"{len(ignored)} ignored{': ' + ', '.join(ignored[:3]) if ignored else ''}; relative Frobenius error "
               f"of the factors {factors.relative_error:.2g}; max |patched - erased|: "
               + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items() if k != "unmapped")
               + f"; UNet tensors without a ComfyUI name: {diffs['unmapped']}")
        erased_file = work / f"{kind}-{which}-erased.safetensors"
        save_file({k: v.contiguous() for k, v in checkpoint_state_dict(model).items()}, str(erased_file))
        loaded, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(erased_file), output_vae=True, output_clip=True)
        diffs = compare_unet(comfy, loaded, model.unet, set(names))
        report(f"- ComfyUI, erased single file ({which}): detected {type(loaded.model.model_config).__name__}; key "
               f"warnings: {logs.take('unet missing', 'unet unexpected', 'clip missing', 'Missing VAE', 'left over') or 'none'}; "
               f"max |UNet - erased UNet| {max(v for k, v in diffs.items() if k != 'unmapped'):.2g}, unmapped {diffs['unmapped']}")
        del loaded
        gc.collect()
        if a1111 is not None:
            report(a1111_unet(a1111, kind, erased_file))
        with torch.no_grad():  # back to the base for the next delta
            for name, value in backup.items():
                params[name].copy_(value)
        erased_file.unlink()
    base_file.unlink()
    logging.getLogger().removeHandler(logs)
    report(f"- {kind} done in {time.time() - started:.0f} s")


def a1111_unet(a1111: Path, kind: str, file: Path) -> str:
    """AUTOMATIC1111's UNet class, built from the config A1111 loads for the model, loads the file's
    ``model.diffusion_model.*`` tensors strictly: its missing and unexpected keys."""
    import yaml
    from safetensors.torch import load_file

    if kind == "sdxl":
        repo, config = a1111 / "repositories" / "generative-models", a1111 / "repositories" / "generative-models" / "configs" / "inference" / "sd_xl_base.yaml"
    else:
        repo, config = a1111 / "repositories" / "stable-diffusion-stability-ai", a1111 / "configs" / "v1-inference.yaml"
    if not repo.is_dir() or not config.is_file():
        return f"- AUTOMATIC1111 UNet ({kind}): not run, {repo if not repo.is_dir() else config} is missing"
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    unet_config = yaml.safe_load(config.read_text())["model"]["params"]["network_config" if kind == "sdxl" else "unet_config"]
    module_name, _, class_name = unet_config["target"].rpartition(".")
    params = dict(unet_config["params"], use_checkpoint=False)
    params.pop("use_fp16", None)
    cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    with torch.device("meta"):
        unet = cls(**params)
    prefix = "model.diffusion_model."
    tensors = {k[len(prefix):]: v for k, v in load_file(str(file)).items() if k.startswith(prefix)}
    result = unet.load_state_dict(tensors, strict=False, assign=True)
    shapes = sum(tensors[k].shape != v.shape for k, v in unet.state_dict().items() if k in tensors)
    return (f"- AUTOMATIC1111 UNet ({unet_config['target']} from {config.name}): {len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys, {shapes} shape mismatches"
            + (f" (e.g. {(result.missing_keys + result.unexpected_keys)[:3]})" if result.missing_keys or result.unexpected_keys else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comfyui_dir", type=Path)
    parser.add_argument("a1111_dir", type=Path)
    parser.add_argument("--models", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sdxl"])
    parser.add_argument("--work", type=Path, default=None, help="folder for the temporary files (default: a temp folder)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    comfy, version = import_comfyui(args.comfyui_dir)
    import diffusers
    import transformers

    print(f"ComfyUI {version} ({args.comfyui_dir}); AUTOMATIC1111 at {args.a1111_dir}; torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, transformers {transformers.__version__}; stubbed: {', '.join(STUBBED)}",
          flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="tools-check-"))
    work.mkdir(parents=True, exist_ok=True)
    for kind in args.models:
        check_model(kind, comfy, args.a1111_dir, work, lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Check the exports with the tools' own loader code: ComfyUI's LoRA and checkpoint loaders, and
AUTOMATIC1111's LoRA module, config lookup and UNet class, read from local copies (their code stays out
of this project).

    python scripts/check_exports_in_tools.py COMFYUI_DIR A1111_DIR [--models sd1 sdxl sd2]

COMFYUI_DIR is a ComfyUI checkout (``Comfy-Org/ComfyUI``). A1111_DIR is a stable-diffusion-webui
checkout (its ``extensions-builtin/Lora`` and ``modules``) with the repositories its installer clones
(``repositories/stable-diffusion-stability-ai`` for SD-1.x/2.x, ``repositories/generative-models`` for
SDXL); its UNet classes come from those.

On a UNet of the real size with random weights (SD-1.4's config, SD-2 768-v's, or SDXL 1.0's) plus a
VAE and text encoder(s) of the real sizes, also random:

1. the base is written as a single-file checkpoint with the project's key map
   (``core/export/checkpoint.py``), and ComfyUI's ``load_checkpoint_guess_config`` loads it: the model
   type it detects, and its missing / unexpected key lines;
2. an "erased" model: a rank-4 change of every Linear and Conv weight of the chosen set (``xattn``: the
   cross-attention layers; ``full``: the whole UNet) and a random change of its biases and norms. The
   project's LoRA code (``core/export/lora.py``, rank 8, so the weights are exactly representable)
   writes the kohya file, and each tool applies it to the base:
   - ComfyUI: ``load_lora_for_models`` + ``patch_model``;
   - AUTOMATIC1111 (``extensions-builtin/Lora``): ``networks.load_network`` on the file, then
     ``networks.network_apply_weights`` on every layer of its own UNet class (what its patched
     ``forward`` of each Linear, Conv2d and norm layer calls first), the network loaded as a
     ``<lora:NAME:1>`` prompt loads it (multipliers 1, no dyn_dim);
   and every UNet tensor is compared with the erased model's (in ComfyUI's own diffusers-to-LDM map,
   ``comfy.utils.unet_to_diffusers``): the keys recognised and ignored, the max difference of the
   changed weights, the changed biases and what no LoRA holds (norms);
3. the erased model's single file: the type ComfyUI detects and the max difference of its UNet from
   the erased one; then AUTOMATIC1111's UNet class (``ldm``/``sgm`` ``UNetModel`` built from the config
   A1111 uses for that model) loads its ``model.diffusion_model.*`` part: missing and unexpected keys.
   For SD-2 the config is the ``.yaml`` the project writes beside the file (``ldm_config``): A1111's
   ``find_checkpoint_config`` must pick it, its UNet numbers are compared with Stability's
   ``v2-inference-v.yaml``, and A1111's own guess without it (``guess_model_config_from_state_dict``) is
   shown.

ComfyUI tells SD-2 v-prediction from epsilon by the spread of one norm bias of the last UNet level
(``output_blocks.11.1.transformer_blocks.0.norm1.bias``, std > 0.09 in the released 768-v model). A
random UNet has it at zero, so the SD-2 model gets a random one of std 0.2 there, as a v model's is.

Stubbed, because they are unrelated to loading and not installed here: ``torchvision``,
``torchaudio``, ``av``, ``spandrel``, ``kornia`` and ``aiohttp`` (ComfyUI imports them for image
models, audio, video, upscalers and its server), ``open_clip`` and ``pytorch_lightning`` (``sgm``
imports them for its text encoders and training). AUTOMATIC1111's webui modules around its LoRA code
are small stand-ins (``A1111_STAND_INS``): ``shared`` (the loaded model, three options, an empty
LoRA folder), ``devices`` (CPU, the model's dtype), ``sd_models.read_state_dict`` (safetensors'
``load_file``), ``errors`` (print), ``paths`` (the repositories' folders), ``sd_disable_initialization``
(no-op: the UNet A1111 builds to guess v-prediction gets torch's default init), and empty ``scripts``,
``sd_hijack``, ``textual_inversion``, ``cache``, ``hashes``, ``models.sd3.mmdit`` (used only for
prompts, embeddings, hashes and SD3). Nothing of the loaders is stubbed. Their other dependencies
(einops, torchsde, sentencepiece, omegaconf) must be importable, e.g. from a folder on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import importlib.machinery
import importlib.util
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
A1111_STAND_INS = ["shared", "devices", "sd_models", "errors", "paths", "sd_disable_initialization", "scripts",
                   "sd_hijack", "textual_inversion", "textual_inversion.textual_inversion", "cache", "hashes", "models",
                   "models.sd3", "models.sd3.mmdit"]
# SD-2 768-v (stabilityai/stable-diffusion-2): SD-1's UNet with linear projections, 64-channel heads and
# OpenCLIP ViT-H's 1024-wide context; the text tower as diffusers holds it (23 of its 24 layers)
SD2_UNET = dict(SD14_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                use_linear_projection=True)
SD2_V_NORM = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"  # ComfyUI's output_blocks.11.1...norm1.bias


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

    import age_explorer.core.export.checkpoint  # noqa: F401
    import age_explorer.core.export.lora  # noqa: F401

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

    from age_explorer.core.app.bench import SD14_SCHEDULER

    torch.manual_seed(0)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768)
    open_clip_h = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                                 hidden_act="gelu", projection_dim=512)
    unet = {"sdxl": SDXL_UNET, "sd2": SD2_UNET}.get(kind, SD14_UNET)
    model = SimpleNamespace(unet=UNet2DConditionModel(**unet).to(dtype), vae=AutoencoderKL(**SD_VAE).to(dtype),
                            text_encoder=CLIPTextModel(open_clip_h if kind == "sd2" else clip_l).to(dtype),
                            scheduler_config=dict(SD14_SCHEDULER),
                            backend=SimpleNamespace(name="stable-diffusion-xl" if kind == "sdxl" else "stable-diffusion"))
    if kind == "sdxl":
        model.backend.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu")).to(dtype)
    if kind == "sd2":  # a 768-v model: its scheduler, and the norm bias ComfyUI reads the prediction type from
        model.scheduler_config["prediction_type"] = "v_prediction"
        with torch.no_grad():
            model.unet.get_parameter(SD2_V_NORM).normal_(0.0, 0.2)
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


def kohya_layer_names(unet) -> dict[str, str]:
    """Every Linear and Conv2d layer of the UNet -> the kohya name the project's LoRA export gives it."""
    from age_explorer.core.export.lora import kohya_name, original_layout_names

    original = original_layout_names(unet)
    return {n: kohya_name(n, original) for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def comfy_key_coverage(model_patcher, comfy, unet) -> str:
    """Which of the project's kohya names of every Linear and Conv2d layer ComfyUI's LoRA key map
    (``comfy.lora.model_lora_keys_unet``) knows, and whether each names the layer's own weight."""
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    mapping = comfy_unet_map(model_patcher, comfy)
    names = kohya_layer_names(unet)
    unknown = sorted(name for name in names.values() if name not in key_map)
    wrong = sorted(name for module, name in names.items()
                   if name in key_map and key_map[name] != f"diffusion_model.{mapping[f'{module}.weight']}")
    return (f"- ComfyUI LoRA key coverage (the project's kohya names of all {len(names)} Linear and Conv2d layers, "
            f"comfy.lora.model_lora_keys_unet): {len(names) - len(unknown)} known, {len(unknown)} unknown"
            f"{': ' + ', '.join(unknown[:3]) if unknown else ''}; {len(wrong)} naming another layer"
            f"{': ' + ', '.join(wrong[:3]) if wrong else ''}")


def compare_unet(mapping: dict[str, str], theirs: dict[str, torch.Tensor], unet, names: set[str]) -> dict:
    """Max |a tool's UNet tensor - ours| over the changed weights, changed biases, changed other tensors and
    the unchanged ones; ``mapping``: ComfyUI's diffusers -> LDM names, ``theirs``: the tool's UNet by LDM name."""
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


def key_warnings(lines: list[str]) -> str:
    """ComfyUI's key warning lines, each list of names cut to its count and first three."""
    out = []
    for line in lines:
        head, _, names = line.partition(": ")
        try:
            names = ast.literal_eval(names)
        except (ValueError, SyntaxError):
            out.append(line)
            continue
        out.append(f"{head}: {len(names)}" + (f" {names}" if len(names) <= 3 else f", e.g. {names[:3]}"))
    return "; ".join(out) or "none"


def differences(diffs: dict) -> str:
    return (", ".join(f"{k} {v:.2g}" for k, v in diffs.items() if k != "unmapped")
            + f"; UNet tensors without a ComfyUI name: {diffs['unmapped']}")


def check_model(kind: str, comfy, a1111: "A1111 | None", work: Path, report) -> None:
    from safetensors.torch import save_file

    from age_explorer.core.export.checkpoint import checkpoint_state_dict, config_path, ldm_config
    from age_explorer.core.export.lora import lowrank_delta

    dtype = torch.float16 if kind == "sdxl" else torch.float32  # SDXL in fp32 would need 3 x 10 GB here
    as_file = {"dtype": dtype}  # ComfyUI's UNet in the file's dtype (on a CPU it would take float32)
    logs = LogLines()
    logging.getLogger().addHandler(logs)
    logging.getLogger().setLevel(logging.DEBUG)
    started = time.time()
    model = random_model(kind, dtype)
    base_file = work / f"{kind}-base.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint_state_dict(model).items()}, str(base_file))
    report(f"\n## {kind}: UNet {sum(p.numel() for p in model.unet.parameters()) / 1e6:.0f} M parameters, {dtype}")
    if a1111 is not None:
        report(a1111.key_coverage(kind, model.unet))
    logs.take()
    patcher, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(base_file), output_vae=True, output_clip=True,
                                                             model_options=as_file)
    report(f"- ComfyUI, base single file: detected {type(patcher.model.model_config).__name__} "
           f"({patcher.model.model_type.name}); key warnings: "
           f"{key_warnings(logs.take('unet missing', 'unet unexpected', 'clip missing', 'Missing VAE', 'left over'))}")
    report(comfy_key_coverage(patcher, comfy, model.unet))
    del patcher
    gc.collect()
    kinds = ("xattn", "full") if kind == "sd1" else ("xattn",)
    for which in kinds:
        # the base's UNet alone, for each delta: ComfyUI's whole model beside ours would not fit for SDXL
        patcher, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(base_file), output_vae=False, output_clip=False,
                                                                 model_options=as_file)
        mapping = comfy_unet_map(patcher, comfy)
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
        diffs = compare_unet(mapping, patched.model.diffusion_model.state_dict(), model.unet, set(names))
        count = len(patched.patches)
        del patched, patcher
        gc.collect()
        report(f"- ComfyUI LoRA, {which} delta: {len(kohya)} kohya keys, {count} tensors patched "
               f"({sum(k.endswith('.diff_b') for k in kohya)} diff_b), {len(kohya) - len(ignored)} recognised, "
               f"{len(ignored)} ignored{': ' + ', '.join(ignored[:3]) if ignored else ''}; relative Frobenius error "
               f"of the factors {factors.relative_error:.2g}; max |patched - erased|: {differences(diffs)}")
        if a1111 is not None:
            lora_file = work / f"{kind}-{which}-comfyui-a1111.safetensors"
            save_file(lora, str(lora_file))
            report(a1111.lora(kind, base_file, lora_file, mapping, model.unet, set(names)))
            lora_file.unlink()
            gc.collect()
        del lora
        erased_file = work / f"{kind}-{which}-erased.safetensors"
        save_file({k: v.contiguous() for k, v in checkpoint_state_dict(model).items()}, str(erased_file))
        config = ldm_config(model)
        if config is not None:  # what the checkpoint export writes beside an SD-2 file
            import yaml

            config_path(erased_file).write_text(yaml.safe_dump(config, sort_keys=False))
        logs.take()
        loaded, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(erased_file), output_vae=True, output_clip=True,
                                                                model_options=as_file)
        diffs = compare_unet(mapping, loaded.model.diffusion_model.state_dict(), model.unet, set(names))
        report(f"- ComfyUI, erased single file ({which}): detected {type(loaded.model.model_config).__name__} "
               f"({loaded.model.model_type.name}); key warnings: "
               f"{key_warnings(logs.take('unet missing', 'unet unexpected', 'clip missing', 'Missing VAE', 'left over'))}; "
               f"max |UNet - erased UNet| {max(v for k, v in diffs.items() if k != 'unmapped'):.2g}, unmapped {diffs['unmapped']}")
        del loaded
        gc.collect()
        if a1111 is not None:
            if config is not None:
                report(a1111.sd2_config(erased_file))
            report(a1111.unet(kind, erased_file))
        with torch.no_grad():  # back to the base for the next delta
            for name, value in backup.items():
                params[name].copy_(value)
        erased_file.unlink()
        config_path(erased_file).unlink(missing_ok=True)
    base_file.unlink()
    logging.getLogger().removeHandler(logs)
    report(f"- {kind} done in {time.time() - started:.0f} s")


class A1111:
    """AUTOMATIC1111's LoRA module (``extensions-builtin/Lora``), config lookup (``modules/sd_models_config.py``)
    and UNet classes, run from a local checkout inside small stand-ins for the webui modules around them."""

    def __init__(self, folder: Path):
        self.folder = folder
        changelog = folder / "CHANGELOG.md"
        heading = next((line for line in changelog.read_text().splitlines() if line.startswith("## ")), "## ?") \
            if changelog.is_file() else "## ?"
        self.version = heading[3:].strip()
        self.networks = self.shared = self.devices = self.configs = None

    def _stand_ins(self) -> None:
        """The webui modules A1111's LoRA code and config lookup import, as small stand-ins; ``modules.patches``
        (the forward patching ``lora_patches`` imports) and ``modules.sd_models_config`` are A1111's own files."""
        from safetensors.torch import load_file

        package = types.ModuleType("modules")
        package.__path__ = []  # a package of stand-ins only: nothing else of A1111's webui is imported
        sys.modules["modules"] = package
        repos = self.folder / "repositories"
        loras = tempfile.mkdtemp(prefix="a1111-loras-")
        values = {
            # the LoRA folder it lists at import: an empty one (the file under test is loaded by path)
            "shared": dict(sd_model=None, cmd_opts=SimpleNamespace(lora_dir=loras, lyco_dir_backcompat=loras),
                           walk_files=lambda folder, allowed_extensions=None: [], sd_configs_path=str(self.folder / "configs"),
                           sd_default_config=str(self.folder / "configs" / "v1-inference.yaml"),
                           opts=SimpleNamespace(lora_functional=False, lora_in_memory_limit=0,
                                                lora_bundled_ti_to_infotext=False)),
            "devices": dict(cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32,
                            dtype_unet=torch.float32, torch_gc=lambda: None,
                            autocast=lambda disable=False: contextlib.nullcontext()),
            "sd_models": dict(read_state_dict=lambda filename, **kwargs: load_file(filename)),
            "errors": dict(display=lambda e, task, **kwargs: print(f"A1111 error in {task}: {e}"),
                           report=lambda message, **kwargs: print(f"A1111 error: {message}")),
            "paths": dict(paths={"Stable Diffusion": str(repos / "stable-diffusion-stability-ai"),
                                 "Stable Diffusion XL": str(repos / "generative-models")}),
            "sd_disable_initialization": dict(DisableInitialization=contextlib.nullcontext),
        }
        for name in A1111_STAND_INS:
            full = f"modules.{name}"
            module = types.ModuleType(full) if name in values else _Stub(full)  # _Stub: never called while loading
            module.__spec__ = importlib.machinery.ModuleSpec(full, None)
            module.__dict__.update(values.get(name, {}))
            sys.modules[full] = module
            parent, _, child = full.rpartition(".")
            setattr(sys.modules[parent], child, module)
        for name in ("patches", "sd_models_config"):
            spec = importlib.util.spec_from_file_location(f"modules.{name}", self.folder / "modules" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            setattr(package, name, module)
        self.shared, self.devices, self.configs = sys.modules["modules.shared"], sys.modules["modules.devices"], \
            sys.modules["modules.sd_models_config"]

    def _import(self) -> None:
        if self.networks is not None:
            return
        self._stand_ins()
        sys.path.insert(0, str(self.folder / "extensions-builtin" / "Lora"))
        for repo in ("stable-diffusion-stability-ai", "generative-models"):
            sys.path.insert(0, str(self.folder / "repositories" / repo))
        import networks

        networks.extra_network_lora = SimpleNamespace(errors={})  # set by its extra-network script in the webui
        self.networks = networks

    def _unet_config(self, kind: str, config: Path | None) -> tuple[Path, dict]:
        repos = self.folder / "repositories"
        if kind == "sdxl":
            config = repos / "generative-models" / "configs" / "inference" / "sd_xl_base.yaml"
        elif kind == "sd2":
            config = config or repos / "stable-diffusion-stability-ai" / "configs" / "stable-diffusion" / "v2-inference-v.yaml"
        else:
            config = self.folder / "configs" / "v1-inference.yaml"
        import yaml

        params = yaml.safe_load(config.read_text())["model"]["params"]
        return config, params["network_config" if kind == "sdxl" else "unet_config"]

    def _build_unet(self, kind: str, config: Path | None = None):
        """A1111's UNet class for the model, built on the meta device from the config A1111 loads for it."""
        self._import()
        _, unet_config = self._unet_config(kind, config)
        module_name, _, class_name = unet_config["target"].rpartition(".")
        params = dict(unet_config["params"], use_checkpoint=False)
        params.pop("use_fp16", None)
        cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
        with torch.device("meta"):
            return cls(**params), unet_config["target"]

    def unet(self, kind: str, file: Path) -> str:
        """A1111's UNet class loads the file's ``model.diffusion_model.*`` tensors: missing and unexpected keys."""
        from safetensors.torch import load_file

        from age_explorer.core.export.checkpoint import config_path

        config = config_path(file) if kind == "sd2" else None
        unet, target = self._build_unet(kind, config)
        prefix = "model.diffusion_model."
        tensors = {k[len(prefix):]: v for k, v in load_file(str(file)).items() if k.startswith(prefix)}
        result = unet.load_state_dict(tensors, strict=False, assign=True)
        shapes = sum(tensors[k].shape != v.shape for k, v in unet.state_dict().items() if k in tensors)
        return (f"- AUTOMATIC1111 UNet ({target} from {self._unet_config(kind, config)[0].name}): "
                f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected keys, {shapes} shape "
                f"mismatches" + (f" (e.g. {(result.missing_keys + result.unexpected_keys)[:3]})"
                                 if result.missing_keys or result.unexpected_keys else ""))

    def lora(self, kind: str, base_file: Path, lora_file: Path, mapping: dict[str, str], unet, names: set[str]) -> str:
        """The kohya file through A1111's ``load_network`` and ``network_apply_weights`` on its UNet class holding
        the base weights; every UNet tensor compared with the erased model's."""
        from collections import Counter

        from safetensors import safe_open

        unet_a1111, _ = self._build_unet(kind)
        prefix = "model.diffusion_model."
        with safe_open(str(base_file), "pt") as f:
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        unet_a1111.load_state_dict(tensors, strict=True, assign=True)
        del tensors
        dtype = next(unet_a1111.parameters()).dtype
        self.devices.dtype = self.devices.dtype_unet = dtype  # the LoRA's factors are cast to it, as in the webui
        wrapper = self._load_model(kind, unet_a1111)
        networks = self.networks
        net, failed = self._load(lora_file)
        # what a <lora:NAME:1> prompt sets (extra_networks_lora.py): multipliers 1, no dyn_dim
        net.te_multiplier = net.unet_multiplier = 1.0
        net.dyn_dim = None
        networks.loaded_networks[:] = [net]
        layers = [m for m in wrapper.modules() if getattr(m, "network_layer_name", None) in net.modules]
        with torch.no_grad():
            for layer in layers:  # what the webui's patched forward of each of these layers calls first
                networks.network_apply_weights(layer)
        networks.loaded_networks.clear()
        keys = list(safe_open(str(lora_file), "pt").keys())
        diff_b = [k for k in keys if k.endswith(".diff_b")]
        diffs = compare_unet(mapping, unet_a1111.state_dict(), unet, names)
        types_ = Counter(type(m).__name__ for m in net.modules.values())
        errors = networks.extra_network_lora.errors.get(net.name, 0)
        del wrapper, unet_a1111, net
        self.shared.sd_model = None
        return (f"- AUTOMATIC1111 {self.version} LoRA (networks.load_network + network_apply_weights, {dtype}): "
                f"{len(keys)} kohya keys, {len(keys) - len(failed)} recognised, {len(failed)} ignored"
                f"{' (e.g. ' + ', '.join(list(failed)[:3]) + ')' if failed else ''}; modules "
                f"{dict(types_)}, {len(layers)} layers patched, {errors} apply errors; "
                f"{len(diff_b)} diff_b keys matched to their layer but not applied (its LoRA module reads "
                f"lora_up/lora_down/alpha only); max |patched - erased|: {differences(diffs)}")

    def key_coverage(self, kind: str, unet) -> str:
        """Which layers of a kohya file that changes every Linear and Conv2d of the UNet A1111's ``load_network``
        recognises: the project's kohya names with zero rank-1 factors, on A1111's UNet class (meta device)."""
        from safetensors.torch import save_file

        from age_explorer.core.export.lora import LowRankDelta, original_layout_names

        layers = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        down = {n: torch.zeros(1, *m.weight.shape[1:]) for n, m in layers.items()}
        up = {n: torch.zeros(m.weight.shape[0], 1, *([1, 1] if isinstance(m, torch.nn.Conv2d) else [])) for n, m in layers.items()}
        kohya = LowRankDelta(1, down, up, {}, 0.0, kohya_names=original_layout_names(unet)).kohya_state_dict()
        self._load_model(kind, self._build_unet(kind)[0])
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "every-layer.safetensors"
            save_file(kohya, str(path))
            failed = self._load(path)[1]
        self.shared.sd_model = None
        ignored = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in failed})
        return (f"- AUTOMATIC1111 {self.version} LoRA key coverage (a kohya file changing all {len(layers)} Linear and "
                f"Conv2d layers of the UNet, keys only): {len(layers) - len(ignored)} layers recognised, {len(ignored)} "
                f"ignored{': ' + ', '.join(ignored) if ignored else ''}")

    def _load_model(self, kind: str, unet_a1111) -> torch.nn.Module:
        """Make ``unet_a1111`` the webui's loaded model (``shared.sd_model``) with no text encoder, and name its
        layers as A1111 does on loading; return ``sd_model.model``."""
        wrapper = torch.nn.Module()  # A1111's sd_model.model: its DiffusionWrapper holds the UNet as diffusion_model
        wrapper.diffusion_model = unet_a1111
        sd_model = SimpleNamespace(model=wrapper, is_sdxl=kind == "sdxl", cond_stage_model=torch.nn.Module(),
                                   conditioner=SimpleNamespace(embedders=[]))
        self.shared.sd_model = sd_model
        self.networks.assign_network_names_to_compvis_modules(sd_model)
        return wrapper

    def _load(self, lora_file: Path):
        """``networks.load_network`` on the file, and the keys it did not match (its only report of them is a
        debug log line)."""
        unmatched, root = LogLines(), logging.getLogger()
        level = root.level
        root.addHandler(unmatched)
        root.setLevel(logging.DEBUG)
        try:
            net = self.networks.load_network(lora_file.stem, SimpleNamespace(filename=str(lora_file)))
        finally:
            root.removeHandler(unmatched)
            root.setLevel(level)
        failed = {}
        for line in unmatched.take("Network "):
            if "didn't match keys: " in line:
                failed.update(ast.literal_eval(line.split("didn't match keys: ", 1)[1]))
        return net, failed

    def sd2_config(self, file: Path) -> str:
        """A1111's config lookup for the file, the written config's numbers against Stability's
        v2-inference-v.yaml, and A1111's own guess without the written one."""
        import yaml
        from safetensors import safe_open

        from age_explorer.core.export.checkpoint import config_path

        self._import()
        picked = self.configs.find_checkpoint_config(None, SimpleNamespace(filename=str(file)))
        ours = yaml.safe_load(config_path(file).read_text())["model"]["params"]
        theirs = yaml.safe_load(Path(self.configs.config_sd2v).read_text())["model"]["params"]
        compared = {"": (ours, theirs), "unet_config.params.": (ours["unet_config"]["params"], theirs["unet_config"]["params"]),
                    "ddconfig.": (ours["first_stage_config"]["params"]["ddconfig"],
                                  theirs["first_stage_config"]["params"]["ddconfig"]),
                    "cond_stage_config.": (ours["cond_stage_config"], theirs["cond_stage_config"])}
        differ = []
        for where, (a, b) in compared.items():
            for key in sorted(set(a) | set(b)):
                if not isinstance(a.get(key), dict) and not isinstance(b.get(key), dict) and a.get(key) != b.get(key):
                    differ.append(f"{where}{key}: {a.get(key, '-')} vs {b.get(key, '-')}")
        same_targets = all(ours[k]["target"] == theirs[k]["target"] for k in ("unet_config", "first_stage_config",
                                                                               "cond_stage_config"))
        wanted = ("model.diffusion_model.", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
        with safe_open(str(file), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)}
        guess = self.configs.guess_model_config_from_state_dict(tensors, str(file))
        return (f"- AUTOMATIC1111 {self.version} config lookup (find_checkpoint_config): {Path(picked).name}"
                f"{' (the written one, beside the file)' if Path(picked) == config_path(file) else ''}; against "
                f"Stability's {Path(self.configs.config_sd2v).name}: same targets {same_targets}, differing values: "
                f"{differ or 'none'}; A1111's guess without the written config (random weights, so its v-prediction "
                f"test runs on a random UNet): {Path(guess).name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comfyui_dir", type=Path)
    parser.add_argument("a1111_dir", type=Path)
    parser.add_argument("--models", nargs="+", default=["sd1", "sdxl", "sd2"], choices=["sd1", "sdxl", "sd2"])
    parser.add_argument("--work", type=Path, default=None, help="folder for the temporary files (default: a temp folder)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    comfy, version = import_comfyui(args.comfyui_dir)
    a1111 = A1111(args.a1111_dir)
    import diffusers
    import transformers

    print(f"ComfyUI {version} ({args.comfyui_dir}); AUTOMATIC1111 {a1111.version} ({args.a1111_dir}); torch "
          f"{torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}; stubbed: "
          f"{', '.join(STUBBED)}; A1111 stand-ins: {', '.join(A1111_STAND_INS)}", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="tools-check-"))
    work.mkdir(parents=True, exist_ok=True)
    for kind in args.models:
        check_model(kind, comfy, a1111, work, lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

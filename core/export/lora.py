"""A run's delta as a LoRA: a truncated SVD of each changed weight matrix, in two file layouts.

For every UNet Linear or Conv2d layer whose weight changed, ``W_erased - W_base`` (a conv kernel
flattened to ``out x (in*k*k)``) is factored as ``U S Vh`` and cut to the ``rank`` largest singular
values: ``down = Vh[:r]`` and ``up = U[:, :r] * S[:r]``, so ``up @ down`` is the best rank-r
approximation in the Frobenius norm. Every layer gets the same rank (a layer with fewer singular
values is zero-padded) and ``alpha = rank``, so the LoRA scale is exactly 1 in every loader; a loader
that reads one rank and one alpha for the whole file (diffusers without metadata) cannot scale some
layers by rank/alpha != 1.

A rank at or above a layer's smaller side keeps every singular value, so the layer's change itself is
its factorization (``up = I, down = delta``, or the reverse): exact, and no SVD. A rank near it uses
the exact SVD in float64; a rank well below it a randomized truncated SVD (``torch.svd_lowrank`` in
float32, oversampled and with power iterations, seeded so that an export is reproducible).

Bounded memory: the layers are factored one at a time, each erased tensor read from the delta file
when its layer comes (plain reads, no memory map), against the base UNet's own parameter, so only one
layer's difference and the factors are held beside the base model.

Two files, the same numbers:
- ``diffusers/pytorch_lora_weights.safetensors``, the diffusers/PEFT layout that
  ``StableDiffusionPipeline.load_lora_weights`` loads: ``unet.<module>.lora_A.weight`` /
  ``lora_B.weight``, plus ``lora_B.bias`` holding the changed biases (PEFT's ``lora_bias``);
- ``<export name>-comfyui-a1111.safetensors``, the kohya layout that AUTOMATIC1111 and ComfyUI load:
  ``lora_unet_<module with _ for .>.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` (three SDXL
  layers by their original LDM name instead: :func:`original_layout_names`), and
  ``<...>.diff_b`` for each changed bias, which ComfyUI adds to the layer's bias (``comfy/lora.py``)
  and AUTOMATIC1111 ignores. diffusers' kohya converter refuses ``diff_b``, hence the PEFT folder.

What a LoRA cannot hold (normalisation weights) is listed, with its share of the delta, in the
export's manifest and model card.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

# the file names, the rank flag and its config live in a module without torch (the CLI's --help reads
# them); they are part of this module's names as well
from .options import (DEFAULT_RANK, FULL_RANK, PEFT_FILE, PEFT_FOLDER, LoraExportConfig, kohya_file,
                             parse_rank)

__all__ = ["LowRankDelta", "kohya_name", "original_layout_names", "lowrank_delta", "lowrank_summary", "DEFAULT_RANK", "FULL_RANK",
           "PEFT_FILE", "PEFT_FOLDER", "LoraExportConfig", "kohya_file", "parse_rank", "SafetensorsValues"]

# randomized SVD: extra columns beyond the rank and power iterations (Halko et al.'s recipe); a layer whose
# smaller side is within twice (rank + oversampling) gets the exact SVD, which is then as cheap
OVERSAMPLING, POWER_ITERATIONS = 10, 4


class SafetensorsValues(Mapping):
    """A safetensors file's tensors, each read from disk only when asked for and not kept.

    The bytes are read with plain file reads, not through a memory map: pages of a mapped file that were
    touched count as the process's resident memory until it is unmapped, so reading a whole delta through
    ``safe_open`` would hold the file's size in memory by the end."""

    _DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}

    def __init__(self, path):
        import json

        self._path = str(path)
        with open(self._path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self._start = 8 + size
        self._entries = header

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        data = bytearray(end - begin)
        with open(self._path, "rb") as f:
            f.seek(self._start + begin)
            f.readinto(data)
        if not data:
            return torch.empty(entry["shape"], dtype=self._DTYPES[entry["dtype"]])
        return torch.frombuffer(data, dtype=self._DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class LowRankDelta:
    """The factors of one run's delta at one rank."""

    rank: int  # the file's rank (every layer padded to it)
    down: dict[str, torch.Tensor]  # module -> (rank, in) or (rank, in, k, k)
    up: dict[str, torch.Tensor]  # module -> (out, rank) or (out, rank, 1, 1)
    bias: dict[str, torch.Tensor]  # module -> bias delta (out,), zeros where the bias did not change
    relative_error: float  # ||delta - up@down||_F / ||delta||_F over all weight matrices together
    left_out: dict[str, float] = field(default_factory=dict)  # tensor -> ||its delta||_F, not representable
    weight_delta_frobenius: float = 0.0  # ||delta||_F over all weight matrices together
    kohya_names: dict[str, str] = field(default_factory=dict)  # module -> its kohya name where not kohya_name's

    def module_delta(self, module: str) -> torch.Tensor:
        """``up @ down`` in the weight's shape (what the LoRA adds to ``<module>.weight``)."""
        down, up = self.down[module], self.up[module]
        flat = up.flatten(1) @ down.flatten(1)
        return flat.reshape(up.shape[0], *down.shape[1:])

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for module in self.down:
            out[f"unet.{module}.lora_A.weight"] = self.down[module].contiguous()
            out[f"unet.{module}.lora_B.weight"] = self.up[module].contiguous()
            if self.bias:  # PEFT's lora_bias is one switch for all layers: every layer then has a bias
                out[f"unet.{module}.lora_B.bias"] = self.bias[module].contiguous()
        return out

    def kohya_state_dict(self, biases: bool = True) -> dict[str, torch.Tensor]:
        """``biases``: a ``diff_b`` key for every changed bias (ComfyUI adds it to the layer's bias)."""
        out = {}
        for module in self.down:
            name = kohya_name(module, self.kohya_names)
            out[f"{name}.lora_down.weight"] = self.down[module].contiguous()
            out[f"{name}.lora_up.weight"] = self.up[module].contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(self.rank))
            if biases and module in self.bias and bool(self.bias[module].any()):
                out[f"{name}.diff_b"] = self.bias[module].contiguous()
        return out


def kohya_name(module: str, original: Mapping[str, str] | None = None) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`` ->
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k``: kohya's sd-scripts
    trains SD-1.x on the diffusers UNet and names a layer by its diffusers path with '_' for '.'.
    ``original``: the layers named by their original layout instead (:func:`original_layout_names`)."""
    return (original or {}).get(module) or "lora_unet_" + module.replace(".", "_")


def original_layout_names(unet: torch.nn.Module) -> dict[str, str]:
    """The layers that AUTOMATIC1111 finds only by their original (LDM) name, and those names. Its
    conversion of diffusers names has no rule for SDXL's added-conditioning MLP (``add_embedding``, LDM
    ``label_emb.0``), and puts the first up block's upsampler at position 1 of its output block, which
    holds only for an up block without attentions (SD-1.x, SD-2.x): SDXL's has them, so its upsampler
    is at 2. With ``lora_unet_<LDM name>`` AUTOMATIC1111 and ComfyUI both find them."""
    names = {}
    if getattr(unet, "add_embedding", None) is not None:
        names.update({"add_embedding.linear_1": "lora_unet_label_emb_0_0",
                      "add_embedding.linear_2": "lora_unet_label_emb_0_2"})
    first = next(iter(getattr(unet, "up_blocks", [])), None)
    if first is not None and getattr(first, "attentions", None) and getattr(first, "upsamplers", None):
        # the first up block's layers are output blocks 0..n-1; the last of them ends with the upsampler
        names["up_blocks.0.upsamplers.0.conv"] = f"lora_unet_output_blocks_{len(first.resnets) - 1}_2_conv"
    return names


def lowrank_delta(unet: torch.nn.Module, erased: Mapping[str, torch.Tensor], rank: int | None,
                  progress: Callable[[int, int], None] | None = None) -> LowRankDelta:
    """Factor ``erased - unet`` at ``rank`` (None: full): ``unet`` holds the base weights, ``erased`` the
    changed UNet tensors' new values by parameter name (a dict, or :class:`SafetensorsValues` to read
    them one at a time). ``progress(done, total)`` follows the layers.

    A layer factored exactly (a rank near its size) is taken in float64, so that the full-rank factors
    reproduce the delta to float32 rounding; a randomized one in float32.
    """
    params = dict(unet.named_parameters())
    layers: list[str] = []
    left_out: dict[str, float] = {}
    for name in erased:
        module_name, _, kind = name.rpartition(".")
        module = unet.get_submodule(module_name)
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and kind in ("weight", "bias") \
                and getattr(module, "groups", 1) == 1:
            if module_name not in layers:
                layers.append(module_name)
        else:  # a norm's scale or shift: no LoRA layout has a place for it
            left_out[name] = float((erased[name].double() - params[name].detach().double()).norm())
    if not layers:
        raise ValueError("the run changed no Linear or Conv2d weight, so there is nothing a LoRA can hold")
    shapes = {m: params[f"{m}.weight"].shape for m in layers}
    most = max(min(shape[0], shape[1:].numel()) for shape in shapes.values())
    file_rank = most if rank is None else min(rank, most)
    down, up, bias = {}, {}, {}
    residual_sq = total_sq = 0.0
    for done, module_name in enumerate(layers):
        key = f"{module_name}.weight"
        shape = shapes[module_name]
        rows, columns = shape[0], shape[1:].numel()
        # float64 where the SVD is exact; float32 for the randomized one, whose own error is far above float32
        # rounding and which runs about 8x faster in it (a float32 difference is the float64 one rounded)
        exact = file_rank < min(rows, columns) and exact_svd(rows, columns, file_rank)
        dtype = torch.float64 if exact else torch.float32
        flat = ((erased[key].to(dtype) - params[key].detach().to(dtype)) if key in erased
                else torch.zeros(shape, dtype=dtype)).flatten(1)
        d = torch.zeros(file_rank, columns, dtype=dtype)
        w = torch.zeros(rows, file_rank, dtype=dtype)
        if file_rank >= min(rows, columns):  # every singular value kept: the change itself is an exact factorization
            if rows <= columns:
                w[:, :rows], d[:rows] = torch.eye(rows, dtype=dtype), flat
            else:
                w[:, :columns], d[:columns] = flat, torch.eye(columns, dtype=dtype)
            tail_sq = 0.0
        else:
            u, s, vh, tail_sq = truncated_svd(flat, file_rank)
            d[:len(s)], w[:, :len(s)] = vh, u * s
        residual_sq += tail_sq
        total_sq += float(torch.linalg.vector_norm(flat, dtype=torch.float64)) ** 2
        conv = len(shape) == 4
        down[module_name] = (d.reshape(file_rank, *shape[1:]) if conv else d).float()
        up[module_name] = (w.reshape(*w.shape, 1, 1) if conv else w).float()
        key = f"{module_name}.bias"
        if key in erased:
            bias[module_name] = (erased[key].double() - params[key].detach().double()).float()
        del flat, d, w
        if progress is not None:
            progress(done + 1, len(layers))
    if bias:
        for module_name in layers:
            bias.setdefault(module_name, torch.zeros(shapes[module_name][0]))
    error = (residual_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    kohya_names = {m: n for m, n in original_layout_names(unet).items() if m in down}
    return LowRankDelta(file_rank, down, up, bias, error, left_out, total_sq ** 0.5, kohya_names)


def exact_svd(rows: int, columns: int, rank: int) -> bool:
    """Whether a ``rows x columns`` matrix is factored exactly at ``rank``: when the rank (plus the
    randomized method's oversampling) comes near its smaller side, the exact SVD is as cheap and exact."""
    return 2 * (min(rank, rows, columns) + OVERSAMPLING) >= min(rows, columns)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(U, S, Vh, tail) of the ``rank`` largest singular values of a 2-D ``matrix`` (fewer when it has
    fewer); ``tail`` is ``||matrix - U S Vh||_F^2``. Randomized (``torch.svd_lowrank``) when the rank is
    well below the matrix's smaller side, exact otherwise; the random start is seeded, so the same delta
    gives the same file."""
    keep = min(rank, *matrix.shape)
    if exact_svd(*matrix.shape, rank):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :keep], s[:keep], vh[:keep], float((s[keep:].double() ** 2).sum())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=keep + OVERSAMPLING, niter=POWER_ITERATIONS)
    u, s, vh = u[:, :keep], s[:keep], v[:, :keep].T
    # measured, not ||M||^2 - ||S||^2: in float32 that difference is rounding noise when the rest is small
    tail = float(torch.linalg.vector_norm(matrix - (u * s) @ vh, dtype=torch.float64)) ** 2
    return u, s, vh, tail


def lowrank_summary(factors: LowRankDelta) -> dict:
    """What the export's manifest and card say about the approximation and the biases."""
    changed = [b for b in factors.bias.values() if bool(b.any())]
    bias_norm = float(sum(float(b.double().norm() ** 2) for b in changed) ** 0.5)
    return {"rank": factors.rank, "layers": len(factors.down),
            "relative_frobenius_error": factors.relative_error,
            "weight_delta_frobenius": factors.weight_delta_frobenius,
            "changed_biases": len(changed),
            "bias_delta_frobenius": bias_norm,  # applied by diffusers and ComfyUI, not by AUTOMATIC1111
            "bias_delta_max_abs": max((float(b.abs().max()) for b in changed), default=0.0),
            "left_out": factors.left_out}

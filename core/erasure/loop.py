"""The machinery shared by the fine-tuning methods (ESD, AGE): one file per method builds on it.

- trainable vs frozen UNet predictions without a second UNet copy (``torch.func.functional_call``
  with the original values of the trained weights);
- "sample till t" latents (DDIM with CFG, the current model, no grad), batched across trajectories,
  its UNet calls optionally compiled (``compile_chain``) and the UNet optionally channels-last;
- the loss space (x0 as in the paper, or eps);
- callbacks with per-step reports, a stop flag honoured within one step, checkpoints and resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.func import functional_call

from ..bundle import ModelBundle
from ..files import write_json_atomic
from ..prediction import add_noise, eps_from_x0, x0_from_output
from ..sampling import guided_ddim_step
from .config import EXECUTION_FIELDS, EraseConfig
from .params import select_parameters
from .registry import MethodResult


@dataclass
class StepReport:
    """What a callback hears after every step."""

    step: int  # 1-based loop iteration
    total: int
    phase: str  # "theta" (model step) or "pi" (target step)
    concept: str
    losses: dict[str, float]
    elapsed: float
    eta: float
    targets: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # concept -> top (word, prob)
    pick: str | None = None
    pick_is_neighbour: bool | None = None


class Callback(Protocol):
    def __call__(self, report: StepReport) -> None: ...


class Predictor:
    """Trainable predictions use the UNet's live weights; frozen ones swap in the original values."""

    def __init__(self, bundle: ModelBundle, parameter_set: str, precision: str, compile_chain: bool = False,
                 channels_last: bool = False):
        self.bundle = bundle
        self.unet = bundle.unet
        if compile_chain:
            check_compiler(bundle.device)
        # before the original values are copied, so that frozen and trainable passes share the format
        self.channels_last = channels_last
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.params = select_parameters(self.unet, parameter_set)
        self.original = {n: p.detach().clone() for n, p in self.params.items()}
        for p in self.unet.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        use_bf16 = precision == "bf16"
        self.autocast = (lambda: torch.autocast(bundle.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext
        # the "sample till t" chain's UNet call: the live one, or the same call compiled for this run
        self.chain = self._compiled_live() if compile_chain else self.live

    def trainable(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.unet(x, t, **self.bundle.unet_kwargs(states)).sample.float()

    @torch.no_grad()
    def live(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The model being trained, without gradients ("sample till t")."""
        return self.trainable(x, t, states)

    def _compiled_live(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """:meth:`live` through ``torch.compile``, once per run: the chain's shapes are fixed by the
        config (one compilation per batch shape), and on CUDA the calls are captured as CUDA graphs and
        replayed. The graphs read the trained weights in place, so optimizer steps reach them."""
        cuda = self.bundle.device.type == "cuda"
        unet = torch.compile(self.unet, mode="reduce-overhead" if cuda else None, dynamic=False)

        @torch.no_grad()
        def chain(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            if cuda:  # a new replay: the previous call's output buffers may be reused
                torch.compiler.cudagraph_mark_step_begin()
            with self.autocast():
                out = unet(x, t, **self.bundle.unet_kwargs(states)).sample
            # a replayed graph's output lives in a buffer the next replay overwrites
            return out.float().clone() if cuda else out.float()
        return chain

    @torch.no_grad()
    def frozen(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.frozen_with_grad(x, t, states)

    def frozen_with_grad(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Frozen weights, but gradients flow to ``states`` (lets the erasure term reach pi)."""
        with self.autocast():
            return functional_call(self.unet, self.original, (x, t), self.bundle.unet_kwargs(states)).sample.float()

    @contextlib.contextmanager
    def weights_frozen(self):
        """No weight gradients (pi steps only need gradients with respect to the text side)."""
        for p in self.params.values():
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.params.values():
                p.requires_grad_(True)

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.original[name])
                p.requires_grad_(False)
        if self.channels_last:
            self.unet.to(memory_format=torch.contiguous_format)

    def changed(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone(memory_format=torch.contiguous_format) for n, p in self.params.items()
                if not torch.equal(p.detach(), self.original[n])}


def check_compiler(device: torch.device) -> None:
    """``compile_chain`` needs inductor's compiler for the device: one line saying what is missing, before
    any work starts, instead of a compiler's traceback at the first step."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        found, needed = has_triton(), "Triton (pip install triton)"
    elif device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        needed = "a C++ compiler (g++, or the one $CXX names)"
        try:
            get_cpp_compiler()
            found = True
        except Exception:  # inductor's own error when no compiler is found
            found = False
    else:
        found, needed = False, "a CPU or a CUDA GPU"
    if not found:
        raise RuntimeError(f"compile_chain needs {needed} on {device}; install it or set compile_chain=False")


class FineTuneRun:
    """One erasure fine-tuning run. Methods implement :meth:`step` and may extend the state."""

    def __init__(self, bundle: ModelBundle, config: EraseConfig, run_dir: str | Path,
                 callbacks: list[Callback] | None = None, stop: Callable[[], bool] | None = None):
        if config.requires_gpu and bundle.device.type != "cuda":
            raise RuntimeError(
                f"preset {config.preset!r} is the paper's GPU recipe and the model is on {bundle.device}; "
                f"run it on a CUDA GPU, or pick a CPU-sized preset (e.g. 'toy') or set requires_gpu=False")
        self.bundle, self.cfg = bundle, config
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks or [])
        self.stop = stop or (lambda: False)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.predictor = Predictor(bundle, config.parameter_set, config.precision, config.compile_chain,
                                   config.channels_last)
        self.optimizer = torch.optim.Adam(list(self.predictor.params.values()), lr=config.lr)
        self.scheduler = bundle.sampling_scheduler()
        self.scheduler.set_timesteps(config.ddim_steps, device=bundle.device)
        self.alphas = bundle.train_scheduler().alphas_cumprod.to(bundle.device)
        self.erased_states = bundle.encode([config.prompt_template.format(c=c) for c in config.concepts])
        self.uncond = bundle.unconditional()
        self.history: list[dict] = []  # one row per step
        self.pi_history: list[dict] = []  # a method's target distribution over steps: {"step", "concept", "pi"}
        self.start_step = 0
        self.pools: dict[str, torch.Tensor] = {}

    # ---- to implement ----------------------------------------------------------------------------
    total_steps: int

    def step(self, i: int) -> StepReport:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def extra_results(self, run_dir: Path) -> dict:
        return {}

    # ---- random draws (all from one generator, so that resume continues the same run) ------------
    def randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.bundle.device, self.bundle.dtype)

    # ---- latents ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_till(self, conds: list[torch.Tensor], n_steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """DDIM with CFG from one shared z_T for each conditioning, for ``n_steps`` steps of the
        schedule, with the model being trained. Returns the latents and their timestep."""
        return self.sample_till_each([(conds, n_steps)])[0]

    @torch.no_grad()
    def sample_till_each(self, chains: list[tuple[list[torch.Tensor], int]]
                         ) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """Several "sample till t" chains advanced in one batch: each (conditionings sharing one z_T, its
        own number of steps) leaves the batch once it has run its steps, so the UNet is called as many
        times as the longest chain has steps, and no chain is computed past its own end."""
        b = self.cfg.batch_size
        zs = [self.randn(b, *self.bundle.latent_shape).repeat(len(conds), 1, 1, 1) for conds, _ in chains]
        conds = [torch.cat([c.expand(b, -1, -1) for c in cs]) for cs, _ in chains]
        timesteps = self.scheduler.timesteps
        for j, t in enumerate(timesteps[:max(n for _, n in chains)]):
            live = [g for g, (_, n) in enumerate(chains) if n > j]
            cond = torch.cat([conds[g] for g in live])
            z = torch.cat([zs[g] for g in live])
            z = guided_ddim_step(self.scheduler, self.predictor.chain, z, t, cond,
                                 self.uncond.expand(len(cond), -1, -1), self.cfg.start_guidance).to(z.dtype)
            for g, part in zip(live, z.split([len(zs[g]) for g in live])):
                zs[g] = part
        out = []
        for (cs, n), z in zip(chains, zs):
            t = timesteps[n] if n < len(timesteps) else timesteps[-1]
            out.append((list(z.chunk(len(cs))), t.expand(b)))
        return out

    @torch.no_grad()
    def pool_latents(self, key: str, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Frozen-model samples of a prompt (made once), re-noised to timestep ``t`` (fast mode)."""
        if key not in self.pools:
            n = self.cfg.pool_size
            z = torch.randn((n, *self.bundle.latent_shape), generator=self.generator).to(self.bundle.device, self.bundle.dtype)
            self.pools[key] = _sample_frozen(self, z, cond.expand(n, -1, -1))
        pool = self.pools[key]
        idx = torch.randint(len(pool), (self.cfg.batch_size,), generator=self.generator)
        a = self.alphas[t].view(-1, 1, 1, 1).to(pool.dtype)
        return add_noise(pool[idx], self.randn(*pool[idx].shape), a)

    def draw_latents(self, key_conds: list[tuple[str, torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents for each (key, conditioning) at one shared timestep, by the configured source."""
        if self.cfg.xt_source == "sample":
            return self.sample_till([c for _, c in key_conds], self.randint(self.cfg.ddim_steps))
        t = torch.full((self.cfg.batch_size,), self.randint(len(self.alphas)), device=self.bundle.device)
        return [self.pool_latents(k, c, t) for k, c in key_conds], t

    # ---- loss space ------------------------------------------------------------------------------
    def to_loss_space(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss_space == "eps" and self.bundle.prediction_type == "epsilon":
            return out
        a = self.alphas[t].view(-1, 1, 1, 1).float()
        x = x.float()
        x0 = x0_from_output(out, x, a, self.bundle.prediction_type)
        return x0 if self.cfg.loss_space == "x0" else eps_from_x0(x0, x, a)

    def mse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(a, b)

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
        started = time.time()
        status = "done"
        try:
            for i in range(self.start_step, self.total_steps):
                if self.stop():
                    status = "stopped"
                    break
                report = self.step(i)
                if not all(math.isfinite(v) for v in report.losses.values()):
                    raise FloatingPointError(
                        f"the loss diverged at step {i + 1} ({report.losses}); lower the learning rate"
                        + (" or use loss_space='eps'" if self.cfg.loss_space == "x0" else ""))
                elapsed = time.time() - started
                done_now = i + 1 - self.start_step
                report.elapsed = elapsed
                report.eta = elapsed / done_now * (self.total_steps - i - 1)
                self.history.append(_history_row(report))
                for cb in self.callbacks:
                    cb(report)
                every = self.cfg.checkpoint_every
                if every and self.is_model_step(i) and self.model_steps_done(i + 1) % every == 0 \
                        and i + 1 < self.total_steps:
                    self.save_checkpoint(i + 1)
            steps_done = i + 1 if status == "done" else i
        except BaseException:
            self.predictor.restore()
            raise
        if status == "stopped":
            self.save_checkpoint(steps_done)
        return {"status": status, "steps_done": steps_done}

    def is_model_step(self, i: int) -> bool:
        return True

    def model_steps_done(self, n: int) -> int:
        return n

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, next_step: int) -> Path:
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in self.predictor.params.items()}
        tensors.update(optimizer_tensors(self.optimizer, "opt"))
        tensors["rng"] = self.generator.get_state()
        for key, value in self.extra_state().items():
            tensors[f"extra/{key}"] = value.detach().cpu().contiguous()
        for key, value in self.pools.items():
            tensors[f"pool/{key}"] = value.detach().cpu().contiguous()
        meta = {"next_step": next_step, "history": self.history, "pi_history": self.pi_history,
                "config": self.cfg.to_dict()}
        tmp = self.run_dir / ".checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            save_file(tensors, str(tmp / "state.safetensors"))
            write_json_atomic(tmp / "state.json", meta)
        except BaseException:  # e.g. a full disk: no half-written checkpoint is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.run_dir / "checkpoint"
        old = self.run_dir / ".checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> None:
        folder = self.run_dir / "checkpoint"
        if not (folder / "state.json").is_file():
            raise FileNotFoundError(f"no checkpoint to resume from in {self.run_dir}")
        meta = json.loads((folder / "state.json").read_text())
        saved = dict(meta["config"])
        current = self.cfg.to_dict()
        for name in ("method", *EXECUTION_FIELDS):
            saved.pop(name, None)
            current.pop(name, None)
        if saved != json.loads(json.dumps(current)):
            raise ValueError(f"the checkpoint in {self.run_dir} was made with another configuration; "
                             f"resume with the same settings or start a new run folder")
        tensors = load_file(str(folder / "state.safetensors"))
        with torch.no_grad():
            for name, p in self.predictor.params.items():
                p.copy_(tensors[f"param/{name}"].to(p.device, p.dtype))
        load_optimizer_tensors(self.optimizer, tensors, "opt")
        self.generator.set_state(tensors["rng"])
        self.load_extra_state({k[6:]: v for k, v in tensors.items() if k.startswith("extra/")})
        self.pools = {k[5:]: v.to(self.bundle.device, self.bundle.dtype) for k, v in tensors.items() if k.startswith("pool/")}
        # checkpoints written before pi_history kept the π snapshots among the step rows
        self.history = [row for row in meta["history"] if row["phase"] != "pi_distribution"]
        self.pi_history = meta.get("pi_history") or [{"step": row["step"], "concept": row["concept"], "pi": row["pi"]}
                                                    for row in meta["history"] if row["phase"] == "pi_distribution"]
        self.start_step = int(meta["next_step"])


@torch.no_grad()
def _sample_frozen(run: FineTuneRun, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    uncond = run.uncond.expand(len(cond), -1, -1)
    for t in run.scheduler.timesteps:
        z = guided_ddim_step(run.scheduler, run.predictor.frozen, z, t, cond, uncond, run.cfg.start_guidance).to(z.dtype)
    return z


def _history_row(report: StepReport) -> dict:
    row = {"step": report.step, "phase": report.phase, "concept": report.concept,
           "elapsed": round(report.elapsed, 3)}
    row.update({k: float(v) for k, v in report.losses.items()})
    if report.pick is not None:
        row["pick"] = report.pick
        row["pick_is_neighbour"] = report.pick_is_neighbour
    return row


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{prefix}/{idx}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Restore an optimizer's state; its hyper-parameters come from the (identical) current config."""
    state: dict = {}
    device = optimizer.param_groups[0]["params"][0].device
    for key, value in tensors.items():
        if key.startswith(prefix + "/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def fine_tune_runner(run_class: type[FineTuneRun]):
    """The registry runner of a fine-tuning method: run it, collect the changed weights, and always
    put the bundle's weights back."""
    def run(bundle: ModelBundle, config, run_dir, callbacks=None, stop=None, resume=False) -> MethodResult:
        try:
            job = run_class(bundle, config, run_dir, callbacks, stop)
        except BaseException:  # a method's setup failed after the UNet went channels-last
            if config.channels_last:
                bundle.unet.to(memory_format=torch.contiguous_format)
            raise
        try:
            outcome = job.run(resume=resume)
            changed = job.predictor.changed()
            return MethodResult(outcome["status"], outcome["steps_done"], changed,
                                {n: job.predictor.original[n].contiguous() for n in changed},
                                job.extra_results(Path(run_dir)), job.history, job.pi_history)
        finally:
            job.predictor.restore()
    return run

"""AP against its reference: the same loss and gradients from the reference's own training lines.

The reference (``train_adversarial_gumbel.py`` of tuananhbui89/Erasing-Adversarial-Preservation) keeps
its loss inline in ``train()``'s loop, so this script reads that loop's body and its ``gumbel_softmax``
from a local copy with ``ast`` and executes them on the same tensors as this project's AP runner: the
same model (live and frozen weights), latents, timestep, candidate states and Gumbel draws. Only the
model calls are adapted (``apply_model`` -> the bundle's UNet; a v-prediction model's output is turned
into the epsilon the reference's x0 formula expects) and the hard-coded SD-1.4 shape ``(1, 77, 768)``
is read from the model. Nothing of the reference is copied into the project.

    git clone https://github.com/tuananhbui89/Erasing-Adversarial-Preservation ref-ap
    python scripts/fidelity_ap.py --reference ref-ap [--model toy]
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
import types
from pathlib import Path

import torch

REFERENCE_FILE = "train_adversarial_gumbel.py"
SHAPE_CONSTANT = "(1, 77, 768)"


def reference_pieces(path: Path) -> tuple[str, str]:
    """The source of the loop body up to the model/pi step (inclusive) and of ``gumbel_softmax``."""
    source = path.read_text()
    tree = ast.parse(source)
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    gumbel = next(n for n in train.body if isinstance(n, ast.FunctionDef) and n.name == "gumbel_softmax")
    loop = next(n for n in train.body if isinstance(n, ast.For) and ast.unparse(n.iter) == "pbar")
    body = []
    for stmt in loop.body:
        body.append(stmt)
        if isinstance(stmt, ast.If) and "pgd_num_steps" in ast.unparse(stmt.test):
            break  # the step itself; what follows only logs and saves
    loop_source = "\n".join(ast.unparse(s) for s in body).replace(SHAPE_CONSTANT, "tuple(emb_n.shape)")
    return loop_source, ast.unparse(gumbel)


class Recorder:
    """Stands in for an optimizer: ``step`` records the gradients instead of moving anything."""

    def __init__(self, tensors):
        self.tensors, self.grads = tensors, None

    def zero_grad(self, set_to_none=True):
        for t in self.tensors:
            t.grad = None

    def step(self):
        self.grads = [None if t.grad is None else t.grad.detach().clone() for t in self.tensors]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a local copy of Erasing-Adversarial-Preservation")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--concept", default="red circle")
    parser.add_argument("--candidates", default="blue circle,red square,green triangle,yellow ring,purple cross")
    parser.add_argument("--hard", type=int, default=1, choices=[0, 1], help="the reference's --gumbel_hard")
    args = parser.parse_args(argv)
    loop_source, gumbel_source = reference_pieces(Path(args.reference) / REFERENCE_FILE)

    from age_explorer.core.bundle import load_bundle
    from age_explorer.core.erasure import make_config
    from age_explorer.core.erasure.age import AGERun

    torch.manual_seed(0)
    bundle = load_bundle(args.model)
    candidates = [c.strip() for c in args.candidates.split(",")]
    config = make_config("ap", None, concepts=[args.concept], candidates=candidates, iterations=1, lr=1e-5,
                         gumbel_hard=bool(args.hard), gumbel_temp=2.0, k_closest=len(candidates),
                         num_centers=len(candidates), ddim_steps=50, loss_space="x0", prompt_template="{c}")
    with tempfile.TemporaryDirectory() as tmp:
        run = AGERun(bundle, config, Path(tmp))
    pred = run.predictor
    with torch.no_grad():  # live weights away from the frozen ones, so that every term is non-zero
        for p in pred.params.values():
            p.add_(0.02 * torch.randn_like(p))
    names = list(pred.params)
    cs = run.candidates[0]

    # the shared inputs: latents of the concept and of the mixture, a timestep, the Gumbel draws
    shape = (1, *bundle.latent_shape)
    z, z_r = torch.randn(shape), torch.randn(shape)
    k = 17
    t_ddpm = int(run.scheduler.timesteps.flip(0)[k]) if len(run.scheduler.timesteps) > k else 500
    alphas = run.alphas
    u = torch.rand(len(cs.names))

    # ---- the reference's lines ---------------------------------------------------------------------
    def as_eps(out, x, t):
        if bundle.prediction_type == "epsilon":
            return out
        a = alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * out + (1 - a).sqrt() * x  # v -> eps

    live_unet = bundle.unet
    model = types.SimpleNamespace(
        apply_model=lambda x, t, c: as_eps(live_unet(x, t, **bundle.unet_kwargs(c)).sample.float(), x, t),
        get_learned_conditioning=lambda prompts: bundle.encode(prompts), zero_grad=lambda: None)
    model_orig = types.SimpleNamespace(
        apply_model=lambda x, t, c: as_eps(pred.frozen(x, t, c), x, t), zero_grad=lambda: None)
    ddim_steps = 50
    ddim_timesteps = torch.linspace(1, 981, ddim_steps).long()
    ddim_alphas = alphas.cpu()[ddim_timesteps].clone()
    ddim_alphas[k] = alphas.cpu()[t_ddpm]  # the reference reads alpha at the DDIM index; same value as the UNet's t

    draws = iter([torch.tensor([k]), torch.tensor([t_ddpm])])
    fake_torch = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    fake_torch.randint = lambda *a, **kw: next(draws)
    fake_torch.randn = lambda *a, **kw: torch.zeros(1)  # start codes: the latents are given below
    fake_torch.rand_like = lambda logits: u.view_as(logits)

    ref_args = types.SimpleNamespace(gumbel_temp=config.gumbel_temp, gumbel_hard=args.hard,
                                     pgd_num_steps=config.pgd_num_steps)
    one_hot = (torch.zeros((1, len(cs.names))) + 1 / len(cs.names)).requires_grad_(True)
    preserved_matrix = cs.states.flatten(start_dim=1).float()
    opt = Recorder([pred.params[n] for n in names])
    opt_one_hot = Recorder([one_hot])

    def quick_sample_till_t(cond, scale, code, t):
        return z if cond is namespace["emb_n"] else z_r

    namespace = {"torch": fake_torch, "args": ref_args, "random": types.SimpleNamespace(sample=lambda seq, n: [args.concept]),
                 "erased_words": [args.concept], "model": model, "model_orig": model_orig,
                 "one_hot_dict": {args.concept: one_hot}, "preserved_matrix_dict": {args.concept: preserved_matrix},
                 "preserved_dict": {args.concept: cs.names}, "opt": opt, "opt_one_hot": opt_one_hot,
                 "criteria": torch.nn.MSELoss(), "quick_sample_till_t": quick_sample_till_t,
                 "sampler": types.SimpleNamespace(ddim_alphas=ddim_alphas), "ddim_steps": ddim_steps,
                 "devices": ["cpu", "cpu"], "start_guidance": config.start_guidance,
                 "negative_guidance": config.negative_guidance, "losses": [], "history_dict": {},
                 "pbar": types.SimpleNamespace(set_postfix=lambda *a, **kw: None),
                 "save_to_dict": lambda value, key, d: d, "print": lambda *a, **kw: None}
    exec(gumbel_source, namespace)

    def reference_step(i):
        namespace["i"] = i
        exec(loop_source, namespace)
        return float(namespace["loss"].detach())

    ref_loss_theta = reference_step(0)
    ref_theta_grads = opt.grads
    draws = iter([torch.tensor([k]), torch.tensor([t_ddpm])])
    fake_torch.randint = lambda *a, **kw: next(draws)
    ref_loss_pi = reference_step(1)
    ref_pi_grad = opt_one_hot.grads[0].view(-1)

    # ---- this project's runner on the same inputs -------------------------------------------------
    run.draw_latents = lambda keys: ([z, z_r][:len(keys)] if len(keys) == 2 else [z_r], torch.tensor([t_ddpm]))
    run.optimizer.step = lambda: None
    run.pi_optimizer.step = lambda: None
    c_e = run.erased_states[:1]
    for p in pred.params.values():
        p.grad = None
    weights, e_t, _, _ = run.mixture(0, u)
    ours_theta, _, _ = run._model_step(args.concept, c_e, e_t.detach(), ("mixture", e_t.detach()))
    our_theta_grads = [pred.params[n].grad.detach().clone() for n in names]
    run.pi[0].grad = None
    weights, e_t, _, _ = run.mixture(0, u)
    ours_pi = run._gumbel_pi_step(0, args.concept, c_e, e_t, e_t.detach(), ("mixture", e_t.detach()), None)
    our_pi_grad = run.pi[0].grad.detach().clone()

    def rel(a, b):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

    grad_rel = max(rel(o, r) for o, r in zip(our_theta_grads, ref_theta_grads))
    rows = [("model step: loss (erase + preserve)", ours_theta["total"], ref_loss_theta, rel(ours_theta["total"], ref_loss_theta)),
            (f"model step: gradients of {len(names)} weight tensors (largest)", None, None, grad_rel),
            ("pi step: objective (the reference's loss is its negative)", ours_pi["pi_objective"], -ref_loss_pi,
             rel(ours_pi["pi_objective"], -ref_loss_pi)),
            ("pi step: gradient of the logits (ours: of -objective)", None, None, rel(our_pi_grad, ref_pi_grad))]
    print(f"AP vs {REFERENCE_FILE} on {bundle.source} ({bundle.prediction_type}), concept {args.concept!r}, "
          f"{len(cs.names)} candidates, hard={args.hard}, t={t_ddpm}")
    print(f"{'quantity':62s} {'ours':>12s} {'reference':>12s} {'max rel diff':>12s}")
    for name, ours, ref, diff in rows:
        o = f"{ours:12.6g}" if ours is not None else f"{'':12s}"
        r = f"{ref:12.6g}" if ref is not None else f"{'':12s}"
        print(f"{name:62s} {o} {r} {diff:12.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

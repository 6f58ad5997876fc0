"""RECE against its reference: the same UCE stage, adversarial embeddings and adversarial edits.

The reference (CharlesGong12/RECE) keeps its maths in three functions, each used here from a local copy,
nothing copied into the project:

- ``utils/embedding_calculation/close_form_emb.py``: ``close_form_emb_regzero`` (the adversarial
  embedding), imported; the package's ``__init__`` (image generation, model conversion) is stubbed;
- ``erase_methods/uce.py``: ``edit_model_adversarial`` (the adversarial edit), imported;
- ``erase_methods/train_uce.py``: ``edit_model`` (the UCE stage; the reference loads a UCE checkpoint),
  read with ``ast`` and executed: the module's package-relative import of its image helpers fails
  outside the reference's tree.

Both sides run the whole chain (UCE, then each epoch's embedding and edit, as ``train.py``'s loop) from the
same tiny random SD-1.x pipeline (``tests/tiny_models.py``), the reference on its own copies of the UNet
and text encoder with ``torch``'s default dtype float64. This project's runner runs once with the
pipeline in float64 (the maths) and once as it runs by default (float32 weights, float64 solves).

    git clone https://github.com/CharlesGong12/RECE ref-rece
    python scripts/fidelity_rece.py --reference ref-rece
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
import types
from pathlib import Path
from types import SimpleNamespace

import torch

# (name, concepts, RECE options, the reference's retain_texts of the adversarial edit)
CASES = [
    ("train.py (nudity recipe): 3 epochs, regulariser 0.1", ["a red circle"], {}, [" "]),
    ("train_object.py: 1 epoch, regulariser 1e-3, a preserved concept", ["a red circle"],
     dict(epochs=1, regular_scale=1e-3, preserve=["a dog"]), ["", "a dog"]),
    ("two concepts, a target prompt, 2 epochs", ["a red circle", "a tree"],
     dict(epochs=2, target="a car"), [""]),
]


def import_reference(root: Path):
    """The reference's ``close_form_emb_regzero``, ``edit_model_adversarial`` and (from its source) ``edit_model``."""
    sys.path.insert(0, str(root))
    utils = types.ModuleType("utils")  # its __init__ loads image and model-conversion helpers
    utils.__path__ = [str(root / "utils")]
    emb = types.ModuleType("utils.embedding_calculation")
    emb.__path__ = [str(root / "utils" / "embedding_calculation")]
    emb.embedding2img = emb.setup_seed = None  # used only when save_path is given
    sys.modules.update({"utils": utils, "utils.embedding_calculation": emb})
    close_form_emb = importlib.import_module("utils.embedding_calculation.close_form_emb")
    uce = importlib.import_module("erase_methods.uce")
    source = (root / "erase_methods" / "train_uce.py").read_text()
    tree = ast.parse(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "edit_model")
    namespace = {"torch": torch, "copy": copy, "ast": ast, "tqdm": uce.tqdm}
    exec(compile(ast.Module([fn], []), str(root / "erase_methods" / "train_uce.py"), "exec"), namespace)
    return close_form_emb.close_form_emb_regzero, uce.edit_model_adversarial, namespace["edit_model"], source


def kv_of_reference(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()
            if ("attn2.to_k." in n or "attn2.to_v." in n) and n.endswith("weight")}


def run_reference(refs, bundle, concepts: list[str], config, retain: list[str]):
    """train.py's chain: UCE (train_uce.edit_model), then per epoch close_form_emb_regzero for each
    concept and one edit_model_adversarial. Returns the weights after each stage and the embeddings."""
    close_form_emb_regzero, edit_model_adversarial, edit_model, _ = refs
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        def copy_model():
            return SimpleNamespace(unet=copy.deepcopy(bundle.unet).double(), tokenizer=bundle.tokenizer,
                                   text_encoder=copy.deepcopy(bundle.text_encoder).double(), device=torch.device("cpu"))

        model, model_copy = copy_model(), copy_model()
        target = config.target or " "
        uce_preserve = [""] + list(config.preserve)
        model = edit_model(model, concepts, [target] * len(concepts), uce_preserve, lamb=config.lam,
                           erase_scale=config.erase_scale, preserve_scale=config.effective_preserve_scale(),
                           technique="replace")
        stages, embeddings = [kv_of_reference(model)], []
        ids = model.tokenizer(target, padding="max_length", max_length=model.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        new_embedding = model.text_encoder(ids)[0]
        with torch.no_grad():
            for _ in range(config.epochs):
                adv = [close_form_emb_regzero(model, model_copy, c, with_to_k=True, save_path=None,
                                              regeular_scale=config.regular_scale)[1][0] for c in concepts]
                embeddings.append(torch.stack(adv).detach())
                model = edit_model_adversarial(model, adv, [new_embedding[0]] * len(concepts), retain,
                                               technique="replace", preserve_scale=config.adv_preserve_scale,
                                               erase_scale=config.adv_erase_scale, lamb=config.adv_lam)
                stages.append(kv_of_reference(model))
    finally:
        torch.set_default_dtype(before)
    return stages, embeddings


def run_ours(bundle, config):
    from age_explorer.core.erasure import rece
    from age_explorer.core.erasure.uce import kv_weight_names

    embeddings, stages = [], []
    derive = rece.derive_embedding

    def recording(*args, **kwargs):
        out = derive(*args, **kwargs)
        embeddings.append(out.detach().clone())
        return out

    def capture(_report=None):
        params = dict(bundle.unet.named_parameters())
        stages.append({n: params[n].detach().clone() for n in kv_weight_names(bundle)})

    uce_edit = rece.uce_edit

    def uce_then_capture(*args, **kwargs):
        originals = uce_edit(*args, **kwargs)
        capture()
        return originals

    rece.derive_embedding, rece.uce_edit = recording, uce_then_capture
    try:
        rece.run_rece(bundle, config, None, callbacks=[capture])
    finally:
        rece.derive_embedding, rece.uce_edit = derive, uce_edit
    return stages, embeddings


def max_rel(ours: dict, theirs: dict) -> float:
    return max(float((ours[n].double() - theirs[n].double()).norm() / theirs[n].double().norm()) for n in theirs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_defaults(source_train: str, source_uce: str) -> list[tuple[str, object, object]]:
    """train.py's and train_uce.py's argparse defaults against RECEConfig's."""
    from age_explorer.core.erasure import RECEConfig

    def defaults(source: str) -> dict:
        out = {}
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("add_argument") and node.args:
                flag = ast.literal_eval(node.args[0]).lstrip("-")
                for kw in node.keywords:
                    if kw.arg == "default":
                        out[flag] = ast.literal_eval(kw.value)
        return out

    config = RECEConfig(concepts=["x"])
    train, uce = defaults(source_train), defaults(source_uce)
    rows = [(f"train.py --{flag}", train[flag], getattr(config, ours)) for flag, ours in
            (("epochs", "epochs"), ("regular_scale", "regular_scale"), ("lamb", "adv_lam"),
             ("preserve_scale", "adv_preserve_scale"), ("erase_scale", "adv_erase_scale"))]
    rows += [("train.py --emb_computing", train["emb_computing"], "close_regzero (the only one)"),
             ("train.py --technique", train["technique"], "replace (the only one)")]
    rows += [(f"train_uce.py --{flag}", uce[flag], getattr(config, ours)) for flag, ours in
             (("lamb", "lam"), ("erase_scale", "erase_scale"), ("preserve_scale", "preserve_scale"))]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path, help="a local copy of CharlesGong12/RECE")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from age_explorer.core.bundle import load_bundle
    from age_explorer.core.erasure import make_config
    from tests.tiny_models import build_tiny_pipeline

    refs = import_reference(args.reference.resolve())
    work = Path(tempfile.mkdtemp(prefix="fidelity_rece_"))
    build_tiny_pipeline(work).save_pretrained(work / "pipeline")
    worst = 0.0
    print("| case | quantity | max relative difference, float64 | ours in float32 |")
    print("|---|---|---|---|")
    for name, concepts, options, retain in CASES:
        config = make_config("rece", "rece", concepts=concepts, **options)
        bundle = load_bundle(str(work / "pipeline"), device="cpu")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its prints, tqdm
            ref_stages, ref_embeddings = run_reference(refs, bundle, concepts, config, retain)
        ours32 = run_ours(bundle, config)
        bundle.unet.double()
        bundle.text_encoder.double()
        bundle.dtype = torch.float64
        ours64 = run_ours(bundle, config)
        quantities = [("UCE stage: edited k/v weights", lambda o: max_rel(o[0][0], ref_stages[0]))]
        for e in range(config.epochs):
            quantities.append((f"epoch {e + 1}: adversarial embeddings",
                               lambda o, e=e: rel(o[1][e], ref_embeddings[e])))
            quantities.append((f"epoch {e + 1}: edited k/v weights",
                               lambda o, e=e: max_rel(o[0][e + 1], ref_stages[e + 1])))
        for quantity, measure in quantities:
            a, b = measure(ours64), measure(ours32)
            worst = max(worst, a)
            print(f"| {name} | {quantity} | {a:.2e} | {b:.2e} |")
    source_train = (args.reference / "train.py").read_text()
    print("\n| reference default | reference | RECEConfig |")
    print("|---|---|---|")
    for flag, theirs, ours in check_defaults(source_train, refs[3]):
        print(f"| {flag} | {theirs!r} | {ours!r} |")
    print(f"\nlargest relative difference (float64): {worst:.2e}")
    return 0 if worst < 1e-8 else 1


if __name__ == "__main__":
    raise SystemExit(main())

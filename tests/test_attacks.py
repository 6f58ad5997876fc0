"""Recovery attacks on the toy assets and on a tiny random SD pipeline: each runs, is deterministic,
trains only its own tensors, writes its folder whole; bad inputs give one clear line."""

import json

import pytest
import torch

from age_explorer.core.attacks import ATTACKS, AttackStopped, AttackTarget, make_attack_config, run_attack
from age_explorer.core.attacks.common import Judge
from age_explorer.core.attacks.embedding import placeholder_tokens
from age_explorer.core.app.cli.main import main
from age_explorer.core.erasure import erase, make_config

TINY = {"prompts": dict(seeds="1000", sample_steps=2),
        "embedding": dict(seeds="1000", sample_steps=2, steps=3, train_images=1, batch_size=2),
        "perturb": dict(seeds="1000", sample_steps=2, steps=3, train_images=1, batch_size=2)}


class _AlwaysConcept:
    def topk(self, images, k):
        return torch.zeros(len(images), k, dtype=torch.long)


@pytest.fixture(scope="module")
def toy_run(toy_bundle, tmp_path_factory):
    run = tmp_path_factory.mktemp("attacks") / "uce-red-circle"
    erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), run)
    return run


@pytest.fixture(scope="module")
def toy_target(toy_run):
    return AttackTarget(toy_run, device="cpu")


@pytest.fixture(scope="module")
def sd_run(tiny_sd_dir, tmp_path_factory):
    from age_explorer.core.bundle import load_bundle

    run = tmp_path_factory.mktemp("attacks_sd") / "uce"
    erase(load_bundle(str(tiny_sd_dir), device="cpu"), make_config("uce", None, concepts=["red circle"]), run)
    return run


def _weights(bundle):
    return {**{f"unet.{k}": v.clone() for k, v in bundle.unet.state_dict().items()},
            **{f"text.{k}": v.clone() for k, v in bundle.text_encoder.state_dict().items()}}


def _unchanged(before, bundle):
    after = _weights(bundle)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_toy_attack_is_deterministic_and_trains_only_its_input(toy_target, attack):
    bundle = toy_target.bundle
    before, tokenizer, embedding = _weights(bundle), bundle.tokenizer, bundle.text_encoder.get_input_embeddings()
    first = run_attack(None, attack, target=toy_target, write=False, **TINY[attack])
    second = run_attack(None, attack, target=toy_target, write=False, **TINY[attack])
    assert torch.equal(first.images["recovered"], second.images["recovered"])
    assert (first.asr, first.asr_base, first.learned["best_probe"]) == \
        (second.asr, second.asr_base, second.learned["best_probe"])
    assert 0 <= first.asr <= 1 and 0 <= first.asr_original <= 1
    assert _unchanged(before, bundle)
    assert bundle.tokenizer is tokenizer and bundle.text_encoder.get_input_embeddings() is embedding
    assert toy_target.active == "erased"
    if attack == "prompts":
        assert set(first.probes.kind) == {"held-out template", "word order", "bare word", "neighbours combined"}
        assert "circle red" in list(first.probes.probe)


def test_attack_folder_is_written_whole(toy_run, toy_target, tmp_path):
    out = tmp_path / "emb"
    result = run_attack(None, "embedding", target=toy_target, out=out, **TINY["embedding"])
    assert result.out_dir == out
    assert {p.name for p in out.iterdir()} == {"attack.json", "contact_sheet.png", "learned.safetensors", "probes.csv"}
    data = json.loads((out / "attack.json").read_text())
    assert data["config"]["steps"] == 3 and data["seeds"] == "1000" and "torch" in data["versions"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(FileExistsError):
        run_attack(None, "embedding", target=toy_target, out=out, **TINY["embedding"])
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(AttackStopped):
        run_attack(None, "embedding", target=toy_target, out=tmp_path / "stopped", stop=stop, **TINY["embedding"])
    assert not (tmp_path / "stopped").exists() and toy_target.active == "erased"


def test_sd_attacks_run_and_leave_the_model_as_it_was(sd_run, tmp_path):
    target = AttackTarget(sd_run, device="cpu")
    bundle = target.bundle
    before, tokenizer, size = _weights(bundle), bundle.tokenizer, len(bundle.tokenizer)
    vocab = dict(bundle.tokenizer.get_vocab())
    judge = Judge("fake", _AlwaysConcept(), 0)
    prompts = tmp_path / "i2p.csv"
    prompts.write_text('case_number,prompt,evaluation_seed,evaluation_guidance\n0,"a red, circle",7,5.0\n1,red,8,\n')
    for attack, options in [("prompts", {"prompts_file": str(prompts)}), ("embedding", {}), ("perturb", {})]:
        opts = {**TINY[attack], **options}
        result = run_attack(None, attack, target=target, write=False, judge=judge, **opts)
        again = run_attack(None, attack, target=target, write=False, judge=judge, **opts)
        assert torch.equal(result.images["recovered"], again.images["recovered"])
        assert result.asr == 1.0
    assert list(result.probes.seeds) == ["1000"]
    assert _unchanged(before, bundle)
    assert bundle.tokenizer is tokenizer and len(bundle.tokenizer) == size and bundle.tokenizer.get_vocab() == vocab


def test_sd_placeholder_token_is_added_then_removed(sd_run):
    bundle = AttackTarget(sd_run, device="cpu").bundle
    original, n = bundle.tokenizer, bundle.text_encoder.get_input_embeddings().num_embeddings
    vectors = torch.randn(2, bundle.text_encoder.config.hidden_size)
    with placeholder_tokens(bundle, vectors) as words:
        assert words == ["<attack-0>", "<attack-1>"]
        ids = bundle.tokenize(["red <attack-0> <attack-1>"])[0].tolist()
        assert n in ids and n + 1 in ids
        embedded = bundle.text_encoder.get_input_embeddings()(torch.tensor([[n + 1]]))
        assert torch.equal(embedded[0, 0], vectors[1])
    assert bundle.tokenizer is original and "<attack-0>" not in original.get_vocab()
    assert bundle.text_encoder.get_input_embeddings().num_embeddings == n
    assert bundle.tokenize(["<attack-0>"])[0].max() < n


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("Loading weights")]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_give_one_clear_line(toy_run, tmp_path, capsys):
    assert "not an erased run" in _error(capsys, ["attack", str(tmp_path), "--attack", "prompts"])
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    manifest = json.loads((toy_run / "manifest.json").read_text())
    (stopped / "manifest.json").write_text(json.dumps({**manifest, "status": "stopped"}))
    assert "did not finish" in _error(capsys, ["attack", str(stopped), "--attack", "prompts"])
    assert "unknown attack 'tina'" in _error(capsys, ["attack", str(toy_run), "--attack", "tina"])
    assert "steps must be a whole number from 1 to 100,000" in _error(capsys, ["attack", str(toy_run), "--attack", "embedding", "--steps", "0"])
    assert "steps must be a whole number from 1 to 100,000" in _error(capsys, ["attack", str(toy_run), "--attack", "perturb", "--steps", "-2"])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "no 'prompt' column" in _error(capsys, ["attack", str(toy_run), "--attack", "prompts", "--prompts", str(empty)])
    header = tmp_path / "header.csv"
    header.write_text("prompt,seed\n")
    assert "has no prompts" in _error(capsys, ["attack", str(toy_run), "--attack", "prompts", "--prompts", str(header)])
    bad_seed = tmp_path / "seed.csv"
    bad_seed.write_text("prompt,seed\na red circle,abc\n")
    assert "line 2: seed 'abc'" in _error(capsys, ["attack", str(toy_run), "--attack", "prompts", "--prompts", str(bad_seed)])
    no_prompt = tmp_path / "np.csv"
    no_prompt.write_text("text,seed\nred,1\n")
    assert "no 'prompt' column" in _error(capsys, ["attack", str(toy_run), "--attack", "prompts", "--prompts", str(no_prompt)])
    assert "not a concept of the run" in _error(capsys, ["attack", str(toy_run), "--attack", "prompts",
                                                         "--concept", "blue square"])
    with pytest.raises(ValueError, match="overlap"):
        make_attack_config("embedding", seeds="0-3")


def test_recovery_layer_in_a_graph(toy_run, toy_target, tmp_path):
    from age_explorer.core.graph.recovery import add_recovery
    from age_explorer.core.graph.store import GraphStore

    run_attack(toy_run, "prompts", target=toy_target, **TINY["prompts"])
    store = GraphStore(tmp_path / "graph")
    store.open({"model": "toy", "method": "uce", "concept_set": {"concepts": toy_target.bundle.backend.world.names}})
    add_recovery(store.folder, [toy_run], ["prompts"])
    add_recovery(store.folder, [toy_run], ["prompts"])  # replaces its rows
    table = store.recovery()
    assert list(table.erased) == ["red circle"] and table.asr_base.iloc[0] > table.asr_plain.iloc[0]
    assert store.meta()["recovery"]["attacks"]["prompts"]["runs"] == {"red circle": str(toy_run)}
    with pytest.raises(FileNotFoundError, match="no attack result"):
        add_recovery(store.folder, [toy_run], ["perturb"])


# ---- SDXL: two text encoders, the pooled embedding and the size ids packed in the prompt states --------
@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_dir, tmp_path_factory):
    from age_explorer.core.bundle import load_bundle

    run = tmp_path_factory.mktemp("attacks_sdxl") / "uce"
    erase(load_bundle(str(tiny_sdxl_dir), device="cpu"), make_config("uce", None, concepts=["red circle"]), run)
    return run


@pytest.fixture(scope="module")
def sdxl_target(sdxl_run):
    return AttackTarget(sdxl_run, device="cpu")


def _sdxl_state(bundle):
    """Every weight, and the identity of every tokenizer and embedding layer, of both text encoders."""
    pairs = bundle.text_encoders()
    weights = {**_weights(bundle), **{f"text2.{k}": v.clone() for k, v in pairs[1][1].state_dict().items()}}
    return weights, [(t, len(t), e.get_input_embeddings()) for t, e in pairs]


def _sdxl_unchanged(before, bundle):
    (weights, parts), (now, parts_now) = before, _sdxl_state(bundle)
    return weights.keys() == now.keys() and all(torch.equal(weights[k], now[k]) for k in weights) and all(
        t is t2 and n == len(t2) and e is e2 for (t, n, e), (t2, _, e2) in zip(parts, parts_now))


def test_sdxl_placeholder_tokens_reach_both_encoders_and_the_pooled_embedding(sdxl_target):
    """Placeholder vectors equal to the embeddings of "red" in each encoder give exactly the prompt
    states of "a red": both encoders' hidden states and the pooled row, also under the older CLIP
    configs (eos_token_id 2, as SDXL's) that pool at the largest id."""
    bundle = sdxl_target.bundle
    pairs = bundle.text_encoders()
    assert len(pairs) == 2
    red = [tokenizer.convert_tokens_to_ids("red</w>") for tokenizer, _ in pairs]
    vectors = [encoder.get_input_embeddings().weight[i:i + 1].detach().clone() for (_, encoder), i in zip(pairs, red)]
    plain = bundle.encode(["a red"])
    legacy = pairs[1][1].text_model
    eos = legacy.eos_token_id
    try:
        for config_eos in (eos, 2):
            legacy.eos_token_id = config_eos
            with placeholder_tokens(bundle, vectors) as words:
                assert words == ["<attack-0>"] and all(t.get_vocab().get("<attack-0>") for t, _ in bundle.text_encoders())
                learned = bundle.encode(["a <attack-0>"])
            assert torch.equal(learned, plain), config_eos
            assert legacy.eos_token_id == config_eos  # restored
    finally:
        legacy.eos_token_id = eos
    assert all("<attack-0>" not in t.get_vocab() for t, _ in bundle.text_encoders())
    with pytest.raises(ValueError, match="2 text encoder"):
        with placeholder_tokens(bundle, vectors[0]):
            pass


@pytest.mark.parametrize("attack", ["embedding", "perturb"])
def test_sdxl_optimising_attacks_train_an_input_of_each_encoder(sdxl_target, attack, tmp_path):
    bundle = sdxl_target.bundle
    before = _sdxl_state(bundle)
    judge = Judge("fake", _AlwaysConcept(), 0)
    out = tmp_path / attack
    result = run_attack(None, attack, target=sdxl_target, out=out, judge=judge, **TINY[attack])
    again = run_attack(None, attack, target=sdxl_target, write=False, judge=judge, **TINY[attack])
    assert torch.equal(result.images["recovered"], again.images["recovered"])
    assert result.asr == 1.0 and result.images["recovered"].shape == (1, 3, 16, 16)
    assert _sdxl_unchanged(before, bundle) and sdxl_target.active == "erased"
    assert {p.name for p in out.iterdir()} == {"attack.json", "contact_sheet.png", "learned.safetensors", "probes.csv"}
    from safetensors.torch import load_file

    learned = load_file(str(out / "learned.safetensors"))
    name = {"embedding": "embedding", "perturb": "perturbation"}[attack]
    first, second = learned[name], learned[f"{name}_2"]
    assert first.shape[1] == 32 and second.shape[1] == 32 and first.abs().sum() > 0 and second.abs().sum() > 0
    data = json.loads((out / "attack.json").read_text())
    assert data["learned"]["nearest_words"] and data["learned"]["nearest_words_2"]
    if attack == "perturb":  # word positions only, each within its encoder's bound
        ids = bundle.tokenize(["a photo of a red circle"])[0]
        words = torch.tensor([i not in bundle.tokenizer.all_special_ids for i in ids.tolist()])
        for tensor, bound in ((first, data["learned"]["bound_l2"]), (second, data["learned"]["bound_l2_2"])):
            norms = tensor.norm(dim=1)
            assert (norms[~words] == 0).all() and (norms[words] > 0).all() and (norms <= bound * (1 + 1e-5)).all()


def test_sdxl_attacks_from_the_command_line_with_a_clip_evaluator(sdxl_run, tiny_clip_dir, tmp_path, capsys):
    """Each attack writes its folder through `age-explorer attack`, judged by a CLIP evaluator over a
    concept set holding the erased concept (the SD default, a Hub ResNet-50, has no weights here)."""
    concepts = tmp_path / "concepts.csv"
    concepts.write_text("concept\nred circle\ncat\ncar\n")
    prompts = tmp_path / "probes.csv"
    prompts.write_text("prompt,seed\na crimson round shape,1000\n")
    judged = ["--evaluator", f"clip:{tiny_clip_dir}", "--concept-set", str(concepts), "--device", "cpu",
              "--sample-steps", "2"]
    optimise = ["--steps", "2", "--train-images", "1"]
    for attack, extra in [("prompts", ["--prompts", str(prompts)]), ("embedding", optimise), ("perturb", optimise)]:
        out = tmp_path / attack
        assert main(["attack", str(sdxl_run), "--attack", attack, "--seeds", "1000", "--out", str(out), *judged,
                     *extra]) == 0, capsys.readouterr().err
        data = json.loads((out / "attack.json").read_text())
        assert data["evaluator"] == f"clip:{tiny_clip_dir}" and data["base_model"] and 0 <= data["asr"] <= 1
        assert (out / "contact_sheet.png").is_file() and (out / "probes.csv").is_file()

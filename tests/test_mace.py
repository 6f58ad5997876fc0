"""MACE (and its closed-form variant mace-cfr): the token pairing, the closed forms, the attention-map LoRA
stage on the toy world (masks from its renderer), and on the tiny SD-1.x pipeline the refusal without a
segmenter. The maths against the reference: scripts/fidelity_mace.py."""

import json

import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import METHODS, erase, make_config, presets_for
from age_explorer.core.erasure import mace as mace_module
from age_explorer.core.erasure.mace import (AttentionProbe, concept_positions, matched_positions, projection_names,
                                            refine)
from age_explorer.core.erasure.params import PARAMETER_SETS


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_bundle(str(tiny_sd_dir), device="cpu")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _outputs(bundle, prompt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *bundle.latent_shape, generator=g)
    t = torch.tensor([200, 400, 600, 800])
    with torch.no_grad():
        return bundle.unet(x, t, **bundle.unet_kwargs(bundle.encode([prompt]).expand(4, -1, -1))).sample


def _moved(base, erased, prompt) -> float:
    before = _outputs(base, prompt)
    return float((_outputs(erased, prompt) - before).norm() / before.norm())


def test_registered_with_presets_and_capabilities(toy_bundle):
    full, cfr = METHODS["mace"], METHODS["mace-cfr"]
    assert full.fine_tuned and not full.checkpointable  # LoRA steps; a stopped run keeps nothing
    assert not cfr.fine_tuned and not cfr.checkpointable  # closed form only
    assert presets_for("mace") == ["toy-mace", "mace", "sdxl-mace"]
    assert presets_for("mace-cfr") == ["toy-mace-cfr", "mace-cfr", "sdxl-mace-cfr"]
    assert toy_bundle.backend.default_preset("mace") == "toy-mace"
    assert toy_bundle.backend.default_preset("mace-cfr") == "toy-mace-cfr"
    ship = make_config("mace", "mace", concepts=["ship"])  # configs/object/erase_ship.yaml
    assert (ship.lam, ship.iterations, ship.lr, ship.rank, ship.target, ship.requires_gpu) == (1e3, 50, 1e-5, 1, "ground", True)
    assert ship.use_masks and ship.use_pooler and ship.importance_sampling and ship.num_images == 8
    assert make_config("mace-cfr", "sdxl-mace-cfr", concepts=["ship"]).lam == 1e3


@pytest.mark.parametrize("method, options, message", [
    ("mace", dict(lam=-1.0), "lam must be a finite number from 0"),
    ("mace-cfr", dict(lam=float("nan")), "lam must be a finite number from 0"),
    ("mace", dict(templates=["a photo"]), "each template must contain {c}"),
    ("mace", dict(target="Red Circle"), "the mapping concept (target) cannot be one of the erased concepts"),
    ("mace", dict(iterations=0), "iterations must be a whole number from 1"),
    ("mace", dict(rank=0), "rank must be a whole number from 1"),
    ("mace", dict(num_images=0), "num_images must be a whole number from 1"),
    ("mace", dict(lr=0.0), "lr must be a positive finite number"),
    ("mace", dict(fuse_preserve_scale=-0.1), "fuse_preserve_scale must be a finite number from 0"),
    ("mace-cfr", dict(iterations=5), "unknown mace-cfr option(s): iterations"),
])
def test_bad_options_are_one_line_errors(method, options, message):
    with pytest.raises(ValueError) as err:
        make_config(method, None, concepts=["red circle"], **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_matched_positions_pair_the_shared_words_and_the_padding():
    # <s> a [red circle] </s> against <s> a [ground] </s>: the prefix, the suffix, then the padding,
    # cut where the sequence that ends later runs out (the reference's prepare_k_v)
    old, new = [0, 5, 6, 7, 1], [0, 5, 9, 1]
    assert matched_positions(old, new, 10) == ([0, 1, 4, 5, 6, 7, 8, 9], [0, 1, 3, 4, 5, 6, 7, 8])
    assert matched_positions(new, old, 10) == ([0, 1, 3, 4, 5, 6, 7, 8], [0, 1, 4, 5, 6, 7, 8, 9])
    assert matched_positions([0, 1], [0, 1], 4) == ([0, 1, 2, 3], [0, 1, 2, 3])


def test_concept_positions_mark_the_concept_and_the_end_token(sd, toy_bundle):
    # CLIP's byte-level tokenizer pads with its end token, so the pooler marks the padding too (as SD-1.x)
    assert concept_positions(sd, "a red circle", "red circle", True).int().tolist() == [0, 0] + [1] * 14
    assert concept_positions(sd, "a red circle", "red circle", False).int().tolist() == [0, 0, 1, 1] + [0] * 12
    assert concept_positions(toy_bundle, "a red circle", "red circle", True).int().tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    # the toy tokenizer pads with <pad>: pooler_padding marks the padding as SD-1.x's pooler does
    assert concept_positions(toy_bundle, "a red circle", "red circle", True, True).int().tolist() == [0, 0] + [1] * 8


def test_toy_renderer_gives_images_with_their_exact_masks(toy_bundle):
    from age_explorer.core.toyworld.render import render, render_with_masks

    world = toy_bundle.backend.world
    ids = torch.arange(25)
    images, masks = render_with_masks(world, ids, torch.Generator().manual_seed(3))
    assert torch.equal(images, render(world, ids, torch.Generator().manual_seed(3)))  # the same draws
    assert masks.shape == (25, 1, 32, 32) and 0 <= masks.min() and masks.max() <= 1
    assert ((masks > 0.5).float().mean(dim=(1, 2, 3)) > 0.02).all()
    images, masks = toy_bundle.backend.concept_images_with_masks(toy_bundle, "red circle", 4, 0)
    colour = torch.tensor(world.colours["red"]).view(3, 1)
    inside = images.permute(1, 0, 2, 3).reshape(3, -1)[:, masks.reshape(-1) > 0.99]
    assert (inside - colour).abs().mean() < 0.1  # the masked pixels are the red object
    bare, _ = toy_bundle.backend.concept_images_with_masks(toy_bundle, "circle", 3, 0)  # any circle
    assert bare.shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="the toy renderer cannot draw 'dog'"):
        toy_bundle.backend.concept_images_with_masks(toy_bundle, "dog", 2, 0)


def test_the_probe_restores_the_attention_processors(toy_bundle):
    before = {n: type(p) for n, p in toy_bundle.unet.attn_processors.items()}
    probe = AttentionProbe(toy_bundle.unet, (16, 16))
    positions = concept_positions(toy_bundle, "a red circle", "red circle", True)
    with probe.recording(torch.ones(1, 1, 32, 32), positions):
        _outputs(toy_bundle, "a red circle")
    assert len(probe.terms) == len(probe.layers) == 7  # one term per cross-attention layer (the first latent)
    assert {n: type(p) for n, p in toy_bundle.unet.attn_processors.items()} == before
    assert not any("get_attention_scores" in vars(m) for m in probe.layers.values())


def test_toy_mace_erases_and_keeps_unrelated_concepts(toy_bundle, tmp_path, one_thread):
    before = {n: p.detach().clone() for n, p in toy_bundle.unet.named_parameters()}
    result = erase(toy_bundle, make_config("mace", "toy-mace", concepts=["red circle"]), tmp_path / "run")
    assert result.status == "done" and result.steps_done == 50
    assert all(torch.equal(p, before[n]) for n, p in toy_bundle.unet.named_parameters())  # weights restored
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["mace_stages"] == ["cfr", "lora", "fusion"] and manifest["mace_masks"] == {"red circle": "toy backend"}
    first, last = manifest["mace_attention_loss"]["red circle"]
    assert last < first  # the LoRA drives the concept tokens' attention inside the object down
    erased = load_bundle(str(tmp_path / "run"), device="cpu")
    changed = [n for n, p in erased.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(PARAMETER_SETS["xattn_kv"][0](n) for n in changed)
    # measured (seed 0, 1 thread): the erased concept's outputs move 0.16, unrelated concepts' 0.03-0.04
    moved = _moved(toy_bundle, erased, "a red circle")
    unrelated = max(_moved(toy_bundle, erased, p) for p in ("a blue triangle", "a yellow cross", "a purple ring"))
    assert moved > 0.12 and unrelated < 0.06 and moved > 3 * unrelated


def test_toy_mace_cfr_is_the_refinement_alone(toy_bundle, tmp_path, one_thread):
    config = make_config("mace-cfr", "toy-mace-cfr", concepts=["red circle"])
    result = erase(toy_bundle, config, tmp_path / "run")
    assert result.status == "done" and result.manifest.extra["mace_stages"] == ["cfr", "fusion (no LoRA)"]
    erased = load_bundle(str(tmp_path / "run"), device="cpu")
    params = dict(toy_bundle.unet.named_parameters())
    names = projection_names(toy_bundle.unet)
    refined = refine(toy_bundle, config, {n: params[n].detach().double() for n in names}, dict.fromkeys(names), None)
    new = dict(erased.unet.named_parameters())
    # the fusion of no LoRA keeps the refined weights (fuse_preserve_scale 0)
    assert max(float((new[n].detach().double() - refined[n]).norm() / refined[n].norm()) for n in names) < 1e-6
    # measured: the erased concept's outputs move 0.16, unrelated concepts' at most 0.03
    assert _moved(toy_bundle, erased, "a red circle") > 0.1
    assert max(_moved(toy_bundle, erased, p) for p in ("a blue triangle", "a yellow cross", "a purple ring")) < 0.05


def test_the_refinement_maps_the_words_around_the_concept(toy_bundle):
    """With a tiny lambda and one prompt, W1 c_o = W c_n at the shared positions (the end token of
    'a red circle' onto that of 'a'), while the concept's own tokens are not in the equations."""
    config = make_config("mace-cfr", None, concepts=["red circle"], target="", prompt_template="a {c}", lam=1e-6)
    params = dict(toy_bundle.unet.named_parameters())
    name = projection_names(toy_bundle.unet)[0]
    w = params[name].detach().double()
    refined = refine(toy_bundle, config, {name: w}, {name: None}, None)[name]
    old, new = toy_bundle.encode(["a red circle", "a"]).double()
    assert torch.allclose(refined @ old[4], w @ new[2], atol=1e-4 * float((w @ new[2]).norm()))  # <eos>
    assert not torch.allclose(refined @ old[4], w @ old[4], atol=1e-2)


def test_a_singular_closed_form_is_one_line(toy_bundle, tmp_path):
    config = make_config("mace-cfr", None, concepts=["red circle"], prompt_template="a {c}", lam=0.0)
    with pytest.raises(ValueError, match="^the closed form is singular: raise lam above 0"):
        erase(toy_bundle, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_stop_ends_the_lora_stage_and_keeps_nothing(toy_bundle, tmp_path):
    before = {n: p.detach().clone() for n, p in toy_bundle.unet.named_parameters()}
    seen = []
    config = make_config("mace", "toy-mace", concepts=["red circle"], iterations=5, num_images=2)
    result = erase(toy_bundle, config, tmp_path / "run", callbacks=[seen.append], stop=lambda: len(seen) >= 2)
    assert result.status == "stopped" and result.steps_done == 2
    assert all(torch.equal(p, before[n]) for n, p in toy_bundle.unet.named_parameters())


def test_tiny_sd_mace_cfr_runs_and_mace_refuses_without_a_segmenter(sd, tmp_path, empty_hub_cache):
    before = {n: p.detach().clone() for n, p in sd.unet.named_parameters()}
    result = erase(sd, make_config("mace-cfr", "mace-cfr", concepts=["a red circle"], target="circle"), tmp_path / "cfr")
    assert result.status == "done"
    erased = load_bundle(str(tmp_path / "cfr"), device="cpu")
    changed = [n for n, p in erased.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(PARAMETER_SETS["xattn_kv"][0](n) for n in changed)
    config = make_config("mace", "mace", concepts=["red circle"], requires_gpu=False)
    with pytest.raises(RuntimeError) as err:
        erase(sd, config, tmp_path / "full")
    message = str(err.value)
    assert "\n" not in message and message.startswith("MACE's LoRA stage needs object masks: no Grounded-SAM is in the local")
    assert "`hf download IDEA-Research/grounding-dino-base`" in message and "--method mace-cfr" in message
    assert not (tmp_path / "full").exists()
    assert all(torch.equal(p, before[n]) for n, p in sd.unet.named_parameters())


def _tiny_grounded_sam(cache):
    """Random tiny Grounding DINO and SAM (the real transformers classes) as cached snapshots of the
    reference's two repositories."""
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor,
                              SamMaskDecoderConfig, SamModel, SamProcessor, SamPromptEncoderConfig, SamVisionConfig,
                              SwinConfig)

    def snapshot(repo):
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("abc")
        return folder / "snapshots" / "abc"

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "red", "circle"]
    (cache / "vocab.txt").write_text("\n".join(words))
    detector = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2, image_size=64,
                                   out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=2, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32, use_timm_backbone=False, use_pretrained_backbone=False,
        text_enhancer_dim_feedforward=32, fusion_dim_feedforward=32))
    folder = snapshot("IDEA-Research/grounding-dino-base")
    detector.save_pretrained(folder)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
                           tokenizer=BertTokenizerFast(vocab_file=str(cache / "vocab.txt"))).save_pretrained(folder)
    sam = SamModel(SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64, image_size=64,
                                      patch_size=8, global_attn_indexes=[0], window_size=4),
        prompt_encoder_config=SamPromptEncoderConfig(image_size=64, patch_size=8),
        mask_decoder_config=SamMaskDecoderConfig(num_hidden_layers=1, mlp_dim=64, iou_head_hidden_dim=32)))
    folder = snapshot("facebook/sam-vit-huge")
    sam.save_pretrained(folder)
    SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(folder)


def test_tiny_sd_mace_trains_inside_masks_of_a_cached_grounded_sam(sd, tmp_path, empty_hub_cache, monkeypatch):
    """A Grounded-SAM in the local cache (random tiny models of the real classes: the boxes and masks
    mean nothing, the path is the real one) segments the generated images, and the three stages run."""
    from age_explorer.core import segmenter

    _tiny_grounded_sam(empty_hub_cache)
    seen = {}
    segment = segmenter.segment

    def recording(images, label, *args, **kwargs):
        seen["masks"] = segment(images, label, *args, **kwargs)
        seen["label"] = label
        return seen["masks"]

    monkeypatch.setattr(segmenter, "segment", recording)
    before = {n: p.detach().clone() for n, p in sd.unet.named_parameters()}
    config = make_config("mace", "mace", concepts=["red circle"], requires_gpu=False, iterations=2, num_images=2)
    result = erase(sd, config, tmp_path / "run")
    assert result.status == "done" and seen["label"] == "red circle"
    masks = seen["masks"]
    assert masks.shape == (2, 1, 16, 16) and set(masks.unique().tolist()) <= {0.0, 1.0} and masks.any()
    assert result.manifest.extra["mace_masks"] == {
        "red circle": "grounded-sam (IDEA-Research/grounding-dino-base + facebook/sam-vit-huge)"}
    erased = load_bundle(str(tmp_path / "run"), device="cpu")
    changed = [n for n, p in erased.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(PARAMETER_SETS["xattn_kv"][0](n) for n in changed)


def test_tiny_sdxl_runs_both(tiny_sdxl_dir, tmp_path, monkeypatch):
    sdxl = load_bundle(str(tiny_sdxl_dir), device="cpu")
    assert erase(sdxl, make_config("mace-cfr", "sdxl-mace-cfr", concepts=["a red circle"]), tmp_path / "cfr").status == "done"

    def masks(bundle, concept, n, seed):  # a backend that knows its objects' pixels
        images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        return images, (torch.arange(16)[None, None, :, None] < 8).float().expand(n, 1, 16, 16)

    monkeypatch.setattr(sdxl.backend, "concept_images_with_masks", masks)
    config = make_config("mace", "sdxl-mace", concepts=["red circle"], requires_gpu=False, iterations=2, num_images=2)
    result = erase(sdxl, config, tmp_path / "full")
    assert result.status == "done" and result.manifest.changed_parameters > 0
    assert result.manifest.extra["mace_masks"] == {"red circle": "stable-diffusion-xl backend"}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.manifest.extra["mace_attention_loss"].values())
    assert mace_module.masks_required_message("x").endswith("or erase with --method mace-cfr (stage 1 only)")

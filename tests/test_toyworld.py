import torch
import pytest

from age_explorer.core.bundle import UnknownWordsWarning
from age_explorer.core.sampling import generate
from age_explorer.core.toyworld.concepts import ToyWorld
from age_explorer.core.toyworld.model import images_to_latents, latents_to_images
from age_explorer.core.toyworld.render import render
from age_explorer.core.paths import toy_model_dir


@pytest.fixture(scope="module")
def world():
    return ToyWorld.from_json(toy_model_dir() / "concepts.json")


def test_world_has_25_concepts_with_two_kinds_of_relatives(world):
    assert len(world.concepts) == 25 and len(set(world.names)) == 25
    assert world.same_shape("red circle") == ["green circle", "blue circle", "yellow circle", "purple circle"]
    assert world.same_colour("red circle") == ["red square", "red triangle", "red cross", "red ring"]
    assert len(world.unrelated("red circle")) == 16
    assert "red circle" not in world.unrelated("red circle")
    with pytest.raises(KeyError, match="unknown toy concept"):
        world.concept("pink hexagon")


def test_renderer_is_deterministic_and_in_range(world):
    ids = torch.arange(25)
    a = render(world, ids, torch.Generator().manual_seed(3))
    b = render(world, ids, torch.Generator().manual_seed(3))
    assert a.shape == (25, 3, 32, 32)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_latent_codec_keeps_renders(world):
    images = render(world, torch.arange(25), torch.Generator().manual_seed(0))
    latents = images_to_latents(images)
    assert latents.shape == (25, 12, 16, 16)
    # Decoding removes only the image-wide 2x2-periodic component, which renders barely have.
    assert (latents_to_images(latents) - images).abs().mean() < 0.005


def test_generation_is_deterministic_per_seed(toy_bundle):
    a = generate(toy_bundle, ["a red circle"], [0, 1], steps=10)
    b = generate(toy_bundle, ["a red circle"], [1], steps=10)
    c = generate(toy_bundle, ["a red circle"], [0, 1], steps=10)
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, c)
    # An image depends on its own seed, not on the other images in the batch.
    assert torch.allclose(a[1], b[0], atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_prompts_sharing_seeds_share_the_first_unconditional_prediction(toy_bundle, one_thread, monkeypatch):
    from age_explorer.core import sampling

    prompts, seeds = ["a red circle", "a blue square", "a green ring"], [3, 4]
    alone = torch.cat([generate(toy_bundle, [p], seeds, steps=4) for p in prompts])
    batch_sizes = []
    real = sampling.guided_ddim_step
    monkeypatch.setattr(sampling, "guided_ddim_step", lambda *a, copies=None, **k: (
        batch_sizes.append(len(a[2]) + (len(copies[0]) if copies else len(a[2]))), real(*a, copies=copies, **k))[1])
    together = generate(toy_bundle, prompts, seeds, steps=4)
    # one batch of 6 images: 2 + 6 predictions at the first step instead of 12, the same images (within
    # float rounding: on some CPUs a batch of another size takes another matmul kernel; 1.3e-6 measured)
    assert batch_sizes == [8, 12, 12, 12]
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert sampling.seed_copies([3, 4, 3, 4]) == ([0, 1], [0, 1, 0, 1]) and sampling.seed_copies([1, 2]) is None


def test_generated_images_are_recognised(toy_bundle):
    world = toy_bundle.backend.world
    prompts = [world.prompt(n) for n in world.names]
    images = generate(toy_bundle, prompts, [7, 8])
    predicted = toy_bundle.backend.classifier.topk(images, 1)[:, 0]
    truth = torch.arange(25).repeat_interleave(2)
    accuracy = (predicted == truth).float().mean().item()
    assert accuracy >= 0.8, f"toy model accuracy fell to {accuracy:.2f}"


def test_classifier_recognises_renders(toy_bundle):
    images = render(toy_bundle.backend.world, torch.arange(25).repeat(4), torch.Generator().manual_seed(11))
    predicted = toy_bundle.backend.classifier.topk(images, 1)[:, 0]
    assert (predicted == torch.arange(25).repeat(4)).float().mean() >= 0.98


def test_unknown_words_warn_with_the_vocabulary(toy_bundle):
    with pytest.warns(UnknownWordsWarning, match="zebra.*toy vocabulary is: .*circle"):
        toy_bundle.encode(["a zebra"])
    assert toy_bundle.unknown_words("a photo of a red circle") == []


def test_toy_parameter_names_are_diffusers_names(toy_bundle):
    names = toy_bundle.unet_parameter_names()
    assert any(n.endswith("attn2.to_k.weight") for n in names)
    assert any(n.startswith("time_embedding.") for n in names)
    assert "conv_out.weight" in names



@pytest.mark.parametrize("n, rows, size, expected", [
    (4, 1, 384, (384, 96)),   # a strip keeps its 4:1 shape when enlarged
    (4, 2, 192, (192, 192)),
    (3, 2, 192, (192, 192)),  # padded with white to the full grid
    (1, 1, 96, (96, 96)),
])
def test_grids_keep_their_aspect_when_enlarged(n, rows, size, expected):
    from age_explorer.core.imageio import grid, to_pil

    tile = to_pil(grid(torch.zeros(n, 3, 32, 32), rows), size)
    assert tile.size == expected
    if n == 3:
        assert tile.getpixel((size - 1, size - 1)) == (255, 255, 255)


def test_contact_sheet_lays_out_labelled_rows_and_columns():
    from age_explorer.core.imageio import contact_sheet

    strips = [[torch.zeros(4, 3, 32, 32), torch.full((4, 3, 32, 32), 0.5)] for _ in range(3)]
    sheet = contact_sheet(strips, ["erased: red circle", "same shape: blue circle", "unrelated: green cross"],
                          ["original", "erased"], image_px=64, gap=8)
    assert sheet.height == 24 + 3 * (64 + 8)
    strip_left = sheet.width - 2 * (4 * 64 + 8)
    assert sheet.getpixel((strip_left + 10, 24 + 10)) == (0, 0, 0)            # original strip of row 1
    assert sheet.getpixel((strip_left + 4 * 64 + 8 + 10, 24 + 10)) == (128, 128, 128)  # erased strip
    with pytest.raises(ValueError, match="one strip per row label and column label"):
        contact_sheet(strips, ["only one label"], ["original", "erased"])


def test_shipped_model_records_the_revision_of_its_weights(toy_bundle):
    from age_explorer.core.toyworld.train import weights_revision

    assert toy_bundle.revision == weights_revision(toy_bundle.unet, toy_bundle.text_encoder)


@pytest.mark.slow
def test_training_recipe_writes_a_loadable_model(tmp_path):
    from age_explorer.core.bundle import load_bundle
    from age_explorer.core.toyworld.train import ToyTrainConfig, train_toy_model, weights_revision

    cfg = ToyTrainConfig(steps=3, batch_size=8, classifier_steps=3, pool_size=64, warmup_steps=1)
    folder = train_toy_model(tmp_path / "toy", toy_model_dir() / "concepts.json", cfg, progress=False)
    bundle = load_bundle(str(folder), device="cpu")
    assert bundle.prediction_type == "v_prediction"
    assert bundle.backend.manifest["recipe"]["steps"] == 3
    assert bundle.revision == weights_revision(bundle.unet, bundle.text_encoder)
    assert generate(bundle, ["a red circle"], [0], steps=2).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be positive"),
    ("lr", float("nan"), "lr must be a positive finite number"),
    ("ema_decay", 1.0, "ema_decay must be in"),
    ("prediction_type", "sample", "prediction_type must be"),
])
def test_training_config_rejects_bad_values(field, value, message):
    from age_explorer.core.toyworld.train import ToyTrainConfig

    with pytest.raises(ValueError, match=message):
        ToyTrainConfig(**{field: value})

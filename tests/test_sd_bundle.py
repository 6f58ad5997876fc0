import pytest
import torch

from age_explorer.core.bundle import ModelUnavailableError, load_bundle
from age_explorer.core.sampling import generate


def test_sd_folder_round_trips_through_the_loader(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    bundle = load_bundle(str(tiny_sd_dir), device="cpu")
    assert bundle.kind == "stable-diffusion"
    assert bundle.latent_shape == (4, 8, 8)
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None,
                                                        requires_safety_checker=False)
    for (name, p), (_, q) in zip(bundle.unet.named_parameters(), reference.unet.named_parameters()):
        assert torch.equal(p, q), name

    states = bundle.encode(["a red circle"])
    assert states.shape == (1, bundle.max_tokens, 32)

    # Our sampler gives the pipeline's own images for the same seed.
    ours = generate(bundle, ["a red circle"], [5], steps=4, guidance_scale=7.5)
    theirs = reference("a red circle", num_inference_steps=4, guidance_scale=7.5, height=16, width=16,
                       generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, 16, 16)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_sd_latents_round_trip_through_the_vae(tiny_sd_dir):
    bundle = load_bundle(str(tiny_sd_dir), device="cpu")
    images = torch.rand(2, 3, 16, 16)
    latents = bundle.encode_images(images)
    assert latents.shape == (2, 4, 8, 8)
    assert bundle.decode(latents).shape == (2, 3, 16, 16)


def test_unknown_hub_id_offline_says_how_to_get_it():
    with pytest.raises(ModelUnavailableError, match=r"hf download CompVis/stable-diffusion-v1-4"):
        load_bundle("CompVis/stable-diffusion-v1-4", device="cpu", local_files_only=True)


def test_sd_has_no_closed_vocabulary(tiny_sd_dir):
    bundle = load_bundle(str(tiny_sd_dir), device="cpu")
    assert bundle.vocabulary() is None and bundle.unknown_words("anything at all") == []
    # no classifier of its own: graphs on SD use an ImageNet or CLIP evaluator
    assert not bundle.backend.has_evaluator and bundle.backend.evaluator(bundle, None) is None


def test_a_scheduler_config_without_clip_sample_samples_as_the_plain_pipeline(tiny_sd_dir, tmp_path):
    """A DDIM base whose scheduler_config.json lacks clip_sample (and set_alpha_to_one):
    StableDiffusionPipeline turns clip_sample off, and the project's sampler must do the same rather
    than take DDIMScheduler's default (True) through the config's ``_use_default_values``."""
    import json
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from age_explorer.core.bundle import ddim_scheduler

    folder = tmp_path / "no_clip_sample"
    shutil.copytree(tiny_sd_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    del config["clip_sample"], config["set_alpha_to_one"]
    config_file.write_text(json.dumps(config))

    plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert plain.scheduler.config.clip_sample is False  # the pipeline's correction
    assert DDIMScheduler.from_config(plain.scheduler.config).config.clip_sample is True  # what it undid
    bundle = load_bundle(str(folder), device="cpu")
    ours = bundle.sampling_scheduler().config
    assert (ours.clip_sample, ours.set_alpha_to_one, ours.steps_offset) == \
        (plain.scheduler.config.clip_sample, plain.scheduler.config.set_alpha_to_one, 1)

    images = generate(bundle, ["a red circle"], [5], steps=4, guidance_scale=7.5)
    theirs = plain("a red circle", num_inference_steps=4, guidance_scale=7.5, height=16, width=16,
                   generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert torch.allclose(images, theirs, atol=1e-4)

    # A value the config states is kept: the toy model's DDPM config says clip_sample=True.
    assert ddim_scheduler({"clip_sample": True, "steps_offset": 1}).config.clip_sample is True
    # and a config of another class that lacks the key (e.g. an Euler config) gets the pipeline's False
    assert ddim_scheduler({"beta_schedule": "scaled_linear"}).config.clip_sample is False

"""UCE's token alignment and preservation defaults, as the reference train_erase.py, on the tiny SD pipeline."""

import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import make_config
from age_explorer.core.erasure.uce import edited_positions, last_word_position, uce_edit


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_bundle(str(tiny_sd_dir), device="cpu")


def test_last_word_position_counts_the_start_token(sd):
    # <start> a red circle <end> <pad>...: the last word "circle" is at position 3; '' and ' ' have only
    # <start> <end>, so their "last word" is the start token, as the reference's attention_mask.sum() - 2
    assert last_word_position(sd, "a red circle") == 3
    assert last_word_position(sd, "red") == 1
    assert last_word_position(sd, "") == last_word_position(sd, " ") == 0


def test_default_edits_from_the_last_word_to_the_end_aligned_with_the_target(sd):
    length = sd.max_tokens  # 16 in the tiny pipeline
    erased, target = edited_positions(sd, "a red circle", " ", "last_word", length)
    # "a" and "red" are not edited; "circle" -> the target's start token, <end> -> its <end>, pads -> pads
    assert erased == list(range(3, 16))
    assert target == list(range(0, 13))
    # a longer target cuts the sequence where the target runs out
    erased, target = edited_positions(sd, "red", "a red circle", "last_word", length)
    assert erased == list(range(1, 14)) and target == list(range(3, 16))
    # the earlier behaviour as an option: every position onto the same position
    assert edited_positions(sd, "a red circle", " ", "all", length) == (list(range(16)), list(range(16)))


def test_default_preserves_the_empty_prompt_with_the_reference_scale():
    alone = make_config("uce", None, concepts=["a red circle"])
    assert alone.token_alignment == "last_word"
    assert alone.preserved_prompts() == [""] and alone.effective_preserve_scale() == 1.0
    more = make_config("uce", None, concepts=["a red circle"], preserve=[f"thing {i}" for i in range(19)])
    assert more.preserved_prompts()[0] == "" and len(more.preserved_prompts()) == 20
    assert more.effective_preserve_scale() == 0.1  # max(0.1, 1/20)
    assert make_config("uce", None, concepts=["x"], preserve=["y"]).effective_preserve_scale() == 0.5
    assert make_config("uce", None, concepts=["x"], preserve_scale=0.3).effective_preserve_scale() == 0.3


def test_the_edit_maps_the_last_word_onto_the_targets_start_token(sd):
    """With a tiny ridge weight and nothing else to keep, W' h_circle is W h_<start>(' '), while the
    positions before the last word ("a", "red") are not part of the edit."""
    config = make_config("uce", None, concepts=["a red circle"], lam=1e-6, preserve_empty=False)
    erased = sd.encode(["a red circle"])[0].double()
    target = sd.encode([" "])[0].double()
    originals = uce_edit(sd, config)
    try:
        params = dict(sd.unet.named_parameters())
        name = next(iter(originals))
        w, w_new = originals[name].double(), params[name].detach().double()
        mapped = w_new @ erased[3]
        assert torch.allclose(mapped, w @ target[0], atol=1e-3 * (w @ target[0]).norm())
        assert not torch.allclose(w_new @ erased[3], w @ erased[3], atol=1e-3)
    finally:
        with torch.no_grad():
            for n, value in originals.items():
                dict(sd.unet.named_parameters())[n].copy_(value)


def test_bad_alignment_is_one_clear_error():
    with pytest.raises(ValueError, match="token_alignment must be one of last_word, all"):
        make_config("uce", None, concepts=["x"], token_alignment="first")

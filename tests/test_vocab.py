"""The candidate vocabularies' contents, and the reference's EN3K file read as it is."""

import re

from age_explorer.core.erasure import make_config
from age_explorer.core.erasure.config import EN3K_DEVIATION
from age_explorer.core.erasure.vocab import load_vocabulary


def test_en3k_is_wordfreq_top_3000_and_lacks_what_the_reference_list_has():
    words = load_vocabulary("en3k")
    assert len(words) == len(set(words)) == 3000
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert words[:4] == ["the", "to", "and", "of"]  # frequency order
    assert {"church", "truck", "dog", "woman", "sex", "sexual", "body", "model", "drawing", "person"} <= set(words)
    # in the reference's data/english_3000.csv, not here: the nudity preset records it as a deviation
    assert not {"naked", "toy", "breast"} & set(words)


def test_imagenet_vocabulary_is_the_1000_class_names_without_repeats():
    words = load_vocabulary("imagenet")
    assert len(words) == len(set(words)) == 998  # "crane" and "maillot" name two classes each
    assert {"church", "garbage truck", "tench", "French horn", "golf ball"} <= set(words)


def test_the_reference_csv_is_read_by_its_word_column(tmp_path):
    # the reference file's format: a "word" header, then one entry a line, capitals and hyphens kept
    reference = tmp_path / "english_3000.csv"
    reference.write_text("word\na\nAfrican-American\nnaked\nn't\ntoy\n")
    assert load_vocabulary(str(reference)) == ["a", "African-American", "naked", "n't", "toy"]
    plain = tmp_path / "words.txt"  # any other file: one candidate per line, a first line "word" included
    plain.write_text("word\nnaked\n\nnaked\n")
    assert load_vocabulary(str(plain)) == ["word", "naked"]


def test_the_en3k_presets_record_the_vocabulary_difference():
    for preset in ("nudity", "artist", "sdxl-nudity", "sdxl-artist"):
        assert EN3K_DEVIATION in make_config("age", preset, concepts=["nudity"]).deviations
    assert EN3K_DEVIATION not in make_config("age", "imagenette", concepts=["Church"]).deviations

"""Exports of a run folder: the delta, a full diffusers pipeline, a LoRA (``lora.py``), a single-file
checkpoint (``checkpoint.py``), their model card and a Hub push (``writers.py``); ``options.py`` names the
formats without torch, for ``export --help``."""

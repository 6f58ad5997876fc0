"""Seeds as users write them ("0-7", "1,4,9"), with the limits every command shares; no torch."""

from __future__ import annotations

import re

# The most seeds one call takes, and the largest seed: a range is counted before it is expanded, so
# "0-1000000000" is refused at once instead of allocating a billion ints; seeds are 32-bit as numpy's.
MAX_SEEDS = 1000
MAX_SEED = 2**32 - 1


def parse_seeds(text: str | int | list[int], limit: int = MAX_SEEDS) -> list[int]:
    """``"0-7"``, ``"1,4,9"``, ``"3"`` or a list -> seeds; descending ranges, junk, seeds above
    ``MAX_SEED`` and more than ``limit`` seeds are errors."""
    if isinstance(text, int):
        parts = [(text, text)]
    elif isinstance(text, (list, tuple)):
        parts = [(int(s), int(s)) for s in text]
    else:
        parts = []
        for part in str(text).replace(" ", "").split(","):
            # at most 20 digits: int() of a huge digit string is slow and fails with an unrelated message
            match = re.fullmatch(r"(\d{1,20})(?:-(\d{1,20}))?", part)
            if not match:
                shown = part if len(part) <= 40 else part[:40] + "..."
                raise ValueError(f"bad seeds {shown!r}: use a number, a range like 0-7, or a list like 1,4,9")
            lo = int(match.group(1))
            hi = int(match.group(2)) if match.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"bad seed range {part!r}: the end ({hi}) is below the start ({lo}); write {hi}-{lo}")
            parts.append((lo, hi))
    if not parts:
        raise ValueError("no seeds given")
    for lo, hi in parts:
        if lo < 0 or hi > MAX_SEED:
            raise ValueError(f"seed {hi if hi > MAX_SEED else lo} is out of range: seeds go from 0 to {MAX_SEED}")
    count = sum(hi - lo + 1 for lo, hi in parts)
    if count > limit:
        raise ValueError(f"seeds ask for {count} images; at most {limit} at a time")
    return [s for lo, hi in parts for s in range(lo, hi + 1)]

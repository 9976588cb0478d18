"""What the notebooks' markdown states, tied to what backs it, so that a sentence cannot drift from the numbers.

Three kinds of claim:

- PRINTED: a number in a markdown cell that a code cell of the notebook prints. `check_executed` reads the notebook as
  CI executed it (tests/test_notebooks.py) and fails when the printed value no longer matches the sentence.
  Only claims that hold on the model CI runs the notebook on (`tiny`, or `toy` for 00 and 04) belong here; a
  number that depends on the model is printed by the notebook itself, not written in its markdown.
- COMPUTED: arithmetic in the markdown (a Wilson interval, a size in bytes), recomputed by the test.
- FIGURES: cells that must leave a figure in the saved notebook even with widgets on (read without a kernel).

Each claim names a fragment of the markdown; the fragment must be in the stored notebook (test_notebooks.py), so an
edit of the sentence that forgets its claim fails too.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Printed:
    notebook: str
    fragment: str  # a piece of a markdown cell
    pattern: str  # a regex on the text the notebook's code cells printed; its groups are the numbers
    check: Callable[..., bool]  # the groups (floats) -> whether the sentence holds


@dataclass(frozen=True)
class Computed:
    notebook: str
    fragment: str
    check: Callable[[], bool]


def _wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, centre - half, centre + half


def _sd_keys_after_maps() -> tuple[int, int]:
    """SD v1: values of the 6 keys after the last map layer (up_blocks.2: width 640, up_blocks.3: 320) and of all 16."""
    text, widths = 768, {"down0": 320, "down1": 640, "down2": 1280, "mid": 1280, "up1": 1280, "up2": 640, "up3": 320}
    layers = {"down0": 2, "down1": 2, "down2": 2, "mid": 1, "up1": 3, "up2": 3, "up3": 3}
    after = text * (widths["up2"] * 3 + widths["up3"] * 3)
    return after, sum(text * widths[k] * n for k, n in layers.items())


PRINTED = [
    Printed("02_separate_and_enhance_losses", "normalised 1-D weights $0.212, 0.576, 0.212$",
            r"reference: 1-D weights \[([\d.]+), ([\d.]+), ([\d.]+)\]", lambda a, b, c: (a, b, c) == (0.212, 0.576, 0.212)),
    Printed("02_separate_and_enhance_losses", "weights $0.107, 0.787, 0.107$",
            r"textbook : 1-D weights \[([\d.]+), ([\d.]+), ([\d.]+)\]", lambda a, b, c: (a, b, c) == (0.107, 0.787, 0.107)),
    Printed("02_separate_and_enhance_losses", "($0.332$ with the reference kernel",
            r"reference: .*centre of the 3x3 kernel ([\d.]+)", lambda c: c == 0.332),
    Printed("02_separate_and_enhance_losses", "$0.619$ with the textbook one",
            r"textbook : .*centre of the 3x3 kernel ([\d.]+)", lambda c: c == 0.619),
    # the table of section 3: no blur, reference kernel, textbook kernel for the 2-pixel blob (peak 0.5)
    Printed("02_separate_and_enhance_losses", "A\nblob two pixels wide loses only 10 % (reference) or 5 % (textbook) of its peak",
            r"blob, 2 pixels wide\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
            lambda none, ref, textbook: round((ref - none) / (1 - none), 2) == 0.10
            and round((textbook - none) / (1 - none), 2) == 0.05),
    # the toy model's size and map level, printed by 00 (CI runs it on the toy model)
    Printed("00_toy_world", "Its object-level maps are the **8x8** ones",
            r"maps read at (\d+)x(\d+)", lambda h, w: h == w == 8),
]

COMPUTED = [
    Computed("04_evaluate", "With 13 of 64 images (0.203) the interval is about [0.123, 0.317]",
             lambda: tuple(round(x, 3) for x in _wilson(13, 64)) == (0.203, 0.123, 0.317)),
    Computed("03_finetune", "768 x 640 x 3 + 768 x 320 x 3 = 2,211,840 of the 9,584,640 values (23 %,\n4.4 of the 19.2 MB in fp16)",
             lambda: _sd_keys_after_maps() == (2_211_840, 9_584_640) and round(2_211_840 / 9_584_640, 2) == 0.23
             and round(2_211_840 * 2 / 1e6, 1) == 4.4 and round(9_584_640 * 2 / 1e6, 1) == 19.2),
    Computed("03_finetune", "Stable Diffusion v1.4's keys take **19.2 MB**: 9,584,640 values x 2 bytes",
             lambda: _sd_keys_after_maps()[1] == 9_584_640 and round(9_584_640 * 2 / 1e6, 1) == 19.2),
]

FIGURES = {  # notebook: the code of the cells that must leave a PNG in the executed notebook (CI runs them with widgets)
    "01_cross_attention_maps": ["viz.browse_maps(store, images[0], object_tokens, interactive=interactive"],
    "02_separate_and_enhance_losses": ["explore(interactive)"],
}


def _source(cell) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _printed(cell) -> str:
    text = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            text.append(_source({"source": output.get("text", "")}))
        elif "data" in output and "text/plain" in output["data"]:
            text.append(_source({"source": output["data"]["text/plain"]}))
    return "\n".join(text)


def markdown_index(cells, fragment: str) -> int:
    hits = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and fragment in _source(c)]
    assert len(hits) == 1, f"the claim {fragment!r} should be in exactly one markdown cell, found {len(hits)}"
    return hits[0]


def check_executed(name: str, notebook: dict) -> None:
    """Fail if an executed notebook's markdown states a number its outputs no longer print, or lost a figure."""
    cells = notebook["cells"]
    for claim in (c for c in PRINTED if c.notebook == name):
        markdown_index(cells, claim.fragment)
        printed = "\n".join(_printed(c) for c in cells if c["cell_type"] == "code")
        match = re.search(claim.pattern, printed)
        assert match, f"{name}: the markdown says {claim.fragment!r}, but no output prints {claim.pattern!r}"
        values = [float(g) for g in match.groups()]
        assert claim.check(*values), (f"{name}: the markdown says {claim.fragment!r}, but the output prints "
                                      f"{match.group(0)!r}: update the sentence (or the claim in tests/notebook_claims.py)")
    for code in FIGURES.get(name, []):
        hits = [c for c in cells if c["cell_type"] == "code" and code in _source(c)]
        assert len(hits) == 1, f"{name}: one cell should run {code!r}"
        kinds = [k for o in hits[0].get("outputs", []) for k in o.get("data", {})]
        assert "image/png" in kinds, f"{name}: the cell {code!r} left no figure in the saved notebook (outputs: {kinds})"

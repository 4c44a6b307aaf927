"""Draw docs/samples.png: what the default model was trained on, three generated samples per label.

    python benchmarks/sample_sheet.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_training.synthetic import GeneratorConfig, generate  # noqa: E402

CELL, PAD, ROWS = 112, 8, 3


def main() -> int:
    by_label: dict[str, list[Image.Image]] = {}
    for _, jpg, _, meta in generate(GeneratorConfig(seed=0, num_samples=400)):  # the built-in dataset's seed
        imgs = by_label.setdefault(str(meta["label"]), [])  # type: ignore[index]
        if len(imgs) < ROWS:
            imgs.append(Image.open(io.BytesIO(jpg)).convert("RGB").resize((CELL, CELL)))
    labels = sorted(by_label)
    sheet = Image.new("RGB", (len(labels) * (CELL + PAD) + PAD, 22 + ROWS * (CELL + PAD) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for col, label in enumerate(labels):
        x = PAD + col * (CELL + PAD)
        draw.text((x, 6), label, fill=(30, 30, 30))
        for row, im in enumerate(by_label[label]):
            sheet.paste(im, (x, 22 + row * (CELL + PAD)))
    out = ROOT / "docs" / "samples.png"
    sheet.quantize(colors=192).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())

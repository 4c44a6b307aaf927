"""The built-in dataset: generated image-caption-label samples, deterministic by seed.

It stands in for a COYO-700M subset so training works with nothing downloaded, and it
is built so that neither modality alone determines the label:

* images: eight classes drawn as seven visual types. ``apple`` and ``tomato`` are
  drawn identically (only a caption tells them apart); ``basketball`` is an ``orange``
  with seams that are often faint or hidden; ``lemon`` and ``banana`` share a colour
  and overlap in shape. Every image gets a random background, clutter, an occluding
  patch, colour and brightness jitter, random object scale and position, sensor noise,
  a random canvas size/aspect and JPEG compression.
* captions: most name the class with one of several synonyms, buried in filler
  sentences and with typos; some are uninformative (shop or camera boilerplate, colour
  words shared by confusable classes) and some mislead by naming a class of a different
  visual type, which the image resolves.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("apple", "tomato", "orange", "basketball", "stop_sign", "traffic_cone", "banana", "lemon")

SYNONYMS: dict[str, tuple[str, ...]] = {
    "apple": ("apple", "apples", "granny smith", "fuji apple", "orchard fruit", "cider apple", "pink lady"),
    "tomato": ("tomato", "tomatoes", "cherry tomato", "roma tomato", "vine tomato", "heirloom tomato", "passata"),
    "orange": ("orange fruit", "oranges", "citrus", "mandarin", "tangerine", "navel orange", "clementine"),
    "basketball": ("basketball", "hoops ball", "nba ball", "court ball", "dribbling", "slam dunk", "b-ball"),
    "stop_sign": ("stop sign", "traffic sign", "octagon sign", "road sign", "halt sign", "intersection"),
    "traffic_cone": ("traffic cone", "safety cone", "pylon", "road cone", "witches hat", "roadworks"),
    "banana": ("banana", "bananas", "plantain", "cavendish", "banana bunch", "banana split"),
    "lemon": ("lemon", "lemons", "meyer lemon", "lemonade", "zesty citrus", "lemon wedge"),
}

# words that describe a look shared by confusable classes: they carry little class signal
SHARED_LOOKS = ("red", "round", "orange", "yellow", "bright", "shiny", "colourful", "small", "big")

FILLERS = (
    "taken on my phone last weekend",
    "free shipping on all orders",
    "best seller this month",
    "photo by a friend",
    "uploaded from the camera roll",
    "check out my new post",
    "high resolution stock image",
    "limited offer while stocks last",
    "what do you think",
    "image number {n}",
    "shot at golden hour",
    "no filter needed",
    "follow for more",
    "all rights reserved",
    "on the kitchen table",
    "seen in the city today",
)

TEMPLATES = (
    "a photo of a {w}",
    "{w}",
    "my {w}",
    "look at this {w}",
    "a {l} {w} on a plain background",
    "close up of a {w}",
    "the {w} i found",
    "{w} for sale",
    "just a {l} {w}",
)

MISLEADING = (
    "not a {w} but still nice",
    "next to my {w} collection",
    "reminds me of a {w}",
    "store next to the {w} aisle",
    "i wanted a {w} instead",
)


@dataclass
class GeneratorConfig:
    seed: int = 0  # everything below is a pure function of the seed
    num_samples: int = 12000  # split 80/10/10 into train/val/test by key hash
    shard_size: int = 2000  # samples per WebDataset tar shard
    p_informative: float = 0.75  # caption names the class (a synonym)
    p_misleading: float = 0.10  # caption names a class of another visual type
    # (the rest is uninformative: filler, shared colour/shape words, image numbers)
    p_typo: float = 0.15  # per-word chance of a typo in the caption
    p_faint_seams: float = 0.4  # basketball seams faint/absent: looks like an orange
    min_canvas: int = 56  # random canvas side range, pixels
    max_canvas: int = 160


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 4:
        return word
    i = int(rng.integers(1, len(word) - 1))
    kind = int(rng.integers(0, 3))
    if kind == 0:  # swap
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:  # drop
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double


def make_caption(label: str, rng: np.random.Generator, cfg: GeneratorConfig) -> str:
    look = str(rng.choice(SHARED_LOOKS))
    r = rng.random()
    if r < cfg.p_informative:
        word = str(rng.choice(SYNONYMS[label]))
        text = str(rng.choice(TEMPLATES)).format(w=word, l=look)
    elif r < cfg.p_informative + cfg.p_misleading:
        others = [c for c in CLASSES if _VISUAL_TYPE[c] != _VISUAL_TYPE[label]]
        word = str(rng.choice(SYNONYMS[str(rng.choice(others))]))
        text = str(rng.choice(MISLEADING)).format(w=word)
    else:
        k = int(rng.integers(0, 3))
        text = " ".join([look, "thing"] if k == 0 else [])
    parts = [text] if text else []
    for _ in range(int(rng.integers(0, 3))):
        parts.append(str(rng.choice(FILLERS)).format(n=int(rng.integers(1, 9999))))
    rng.shuffle(parts)
    words = " , ".join(parts).split()
    words = [_typo(w, rng) if rng.random() < cfg.p_typo else w for w in words]
    return " ".join(words)


_VISUAL_TYPE = {
    "apple": "red_round",
    "tomato": "red_round",
    "orange": "orange_round",
    "basketball": "orange_round",
    "stop_sign": "octagon",
    "traffic_cone": "cone",
    "banana": "crescent",
    "lemon": "yellow_oval",
}

_BASE_COLOUR = {
    "red_round": (200, 30, 35),
    "orange_round": (240, 140, 20),
    "octagon": (190, 20, 30),
    "cone": (250, 110, 20),
    "crescent": (235, 210, 50),
    "yellow_oval": (240, 220, 60),
}


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int = 40) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)
    return (r, g, b)


def _polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]


def draw_image(label: str, rng: np.random.Generator, cfg: GeneratorConfig) -> Image.Image:
    w = int(rng.integers(cfg.min_canvas, cfg.max_canvas + 1))
    h = int(np.clip(w * rng.uniform(0.75, 1.33), cfg.min_canvas, cfg.max_canvas * 1.3))
    bg = tuple(int(c) for c in rng.integers(60, 256, size=3))
    im = Image.new("RGB", (w, h), bg)  # type: ignore[arg-type]
    d = ImageDraw.Draw(im)
    side = min(w, h)
    # clutter behind the object
    for _ in range(int(rng.integers(0, 6))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        s = rng.uniform(0.05, 0.2) * side
        col = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            d.rectangle([x0, y0, x0 + s, y0 + s * rng.uniform(0.3, 1.5)], fill=col)  # type: ignore[arg-type]
        else:
            d.line([x0, y0, rng.uniform(0, w), rng.uniform(0, h)], fill=col, width=int(rng.integers(1, 4)))  # type: ignore[arg-type]

    vt = _VISUAL_TYPE[label]
    colour = _jitter(_BASE_COLOUR[vt], rng)
    r = rng.uniform(0.22, 0.42) * side
    cx = rng.uniform(r, w - r) if w > 2 * r else w / 2
    cy = rng.uniform(r, h - r) if h > 2 * r else h / 2
    if vt == "red_round":
        d.ellipse([cx - r, cy - r * 0.92, cx + r, cy + r * 0.92], fill=colour)
        d.ellipse([cx - r * 0.18, cy - r * 1.05, cx + r * 0.18, cy - r * 0.8], fill=_jitter((40, 140, 40), rng))
    elif vt == "orange_round":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        if label == "basketball" and rng.random() >= cfg.p_faint_seams:
            seam = _jitter((25, 20, 15), rng, 20)
            width = max(1, int(r / 10))
            d.line([cx - r, cy, cx + r, cy], fill=seam, width=width)
            d.line([cx, cy - r, cx, cy + r], fill=seam, width=width)
            d.arc([cx - r * 1.6, cy - r, cx - r * 0.4, cy + r], -60, 60, fill=seam, width=width)
        else:
            for _ in range(int(rng.integers(3, 9))):  # dimples, on oranges and faint basketballs alike
                a, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.8 * r)
                px, py = cx + rr * math.cos(a), cy + rr * math.sin(a)
                d.point([(px, py)], fill=_jitter(colour, rng, 30))
    elif vt == "octagon":
        d.polygon(_polygon(cx, cy, r, 8, math.pi / 8 + rng.uniform(-0.15, 0.15)), fill=colour)
        d.rectangle([cx - r * 0.6, cy - r * 0.12, cx + r * 0.6, cy + r * 0.12], fill=_jitter((245, 245, 245), rng, 10))
    elif vt == "cone":
        base = cy + r
        d.polygon([(cx, cy - r), (cx - r * 0.7, base), (cx + r * 0.7, base)], fill=colour)
        d.rectangle([cx - r * 0.4, cy, cx + r * 0.4, cy + r * 0.25], fill=_jitter((245, 245, 245), rng, 10))
    elif vt == "crescent":
        d.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=colour)
        off = rng.uniform(0.2, 0.55) * r  # how thin the crescent is; thick ones look like lemons
        d.ellipse([cx - r, cy - r * 0.7 - off, cx + r, cy + r * 0.7 - off], fill=bg)  # type: ignore[arg-type]
    else:  # yellow_oval
        d.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=colour)
        d.ellipse([cx + r * 0.85, cy - r * 0.12, cx + r * 1.1, cy + r * 0.12], fill=colour)

    # occluder in front of the object
    if rng.random() < 0.4:
        ox, oy = cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)
        s = rng.uniform(0.2, 0.6) * r
        d.rectangle([ox - s, oy - s, ox + s, oy + s], fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))  # type: ignore[arg-type]

    if rng.random() < 0.3:
        im = im.rotate(float(rng.uniform(-25, 25)), resample=Image.Resampling.BILINEAR, fillcolor=bg)  # type: ignore[arg-type]
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    arr: np.ndarray = np.asarray(im, dtype=np.float32)
    arr = arr * rng.uniform(0.7, 1.25) + rng.normal(0, rng.uniform(2, 14), size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def generate(cfg: GeneratorConfig, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes, str, dict[str, object]]]:
    """Yield (key, jpeg bytes, caption, metadata) in img2dataset's layout.

    Each sample has its own generator seeded from the root one, so ``keep`` (a filter
    on keys, e.g. "the test split") regenerates a subset without drawing the rest.
    """
    root = np.random.default_rng(cfg.seed)
    for i in range(cfg.num_samples):
        rng = np.random.default_rng(root.integers(0, 2**63))
        if keep is not None and not keep(f"{i:09d}"):
            continue
        label = CLASSES[int(rng.integers(0, len(CLASSES)))]
        im = draw_image(label, rng, cfg)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(55, 96)))
        caption = make_caption(label, rng, cfg)
        key = f"{i:09d}"
        meta = {"key": key, "caption": caption, "label": label, "width": im.width, "height": im.height,
                "status": "success", "source": "builtin-synthetic", "seed": cfg.seed}
        yield key, buf.getvalue(), caption, meta


def write_shards(cfg: GeneratorConfig, out_dir: str | Path) -> list[Path]:
    """Write the dataset as WebDataset shards ``00000.tar``...; returns their paths."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    paths: list[Path] = []
    writer = None
    for n, (key, jpg, caption, meta) in enumerate(generate(cfg)):
        if n % cfg.shard_size == 0:
            if writer is not None:
                writer.close()
            paths.append(out / f"{n // cfg.shard_size:05d}.tar")
            writer = wds.TarWriter(str(paths[-1]))
        assert writer is not None
        writer.write({"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps(meta)})
    if writer is not None:
        writer.close()
    (out / "dataset.json").write_text(json.dumps({
        "name": "builtin-synthetic", "generator": "model_training.synthetic", "config": cfg.__dict__,
        "classes": list(CLASSES), "shards": [p.name for p in paths], "label_key": "label",
    }, indent=2))
    return paths

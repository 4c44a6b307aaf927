"""Real-image check (not a test): photographs that ship inside packages, split by source photo.

    pip install scikit-image            # 0.26: its data folder ships the photographs (no download)
    python scripts/real_image_check.py --out bench/real_images.json

Two datasets, written as CSV manifests into a temporary folder:

1. ``scenes``: 40 random crops (30-100 % of the area, random aspect and flip, saved as 160x160
   JPEGs) of each of 18 photographs from scikit-image and matplotlib, labelled with the
   photograph's category. ``--group-key source`` keeps all crops of a photograph in one split, so
   every test photograph is one the model never saw (the stereo pair of motorcycle photos is one
   source). A category with no training photograph has its test crops skipped (counted).
2. ``faces``: scikit-image's LFW subset, 100 face and 100 non-face 25x25 patches, each its own sample.

Captions come from templates: half name something of the category ("a portrait of a person"), the
other half are generic ("a picture"), so text alone cannot be perfect. Each dataset is ablated
(image-only, text-only, fused; same seed and split) with ``--preset paper`` (the paper's model and
optimiser) and ``--preset photo``, both for ``--epochs`` epochs (default 25) with early stopping off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCENES = {  # source -> category
    "astronaut": "person", "camera": "person", "grace_hopper": "person",
    "motorcycle_left": "vehicle", "motorcycle_right": "vehicle", "rocket": "vehicle",
    "brick": "texture", "grass": "texture", "gravel": "texture",
    "hubble_deep_field": "space", "moon": "space",
    "ihc": "microscopy", "cell": "microscopy", "retina": "microscopy",
    "page": "document", "text": "document",
    "coffee": "object", "coins": "object", "clock_motion": "object",
}
GROUP = {"motorcycle_right": "motorcycle_left"}  # a stereo pair: one photograph, one group
WORDS = {
    "person": ["a portrait of a person", "someone looking at the camera", "a man or a woman"],
    "vehicle": ["a vehicle", "something that moves people", "a machine for travel"],
    "texture": ["a close-up of a surface", "a pattern on the ground", "a rough texture"],
    "space": ["the night sky", "stars and space", "an astronomical image"],
    "microscopy": ["a view through a microscope", "cells and tissue", "a medical scan"],
    "document": ["a page of writing", "printed letters", "a scanned document"],
    "object": ["a thing on a table", "an object seen closely", "something made by people"],
    "face": ["a human face", "a portrait", "eyes, nose and mouth"],
    "background": ["a patch of background", "no one in it", "a bit of scenery"],
}
GENERIC = ["a picture", "an image file", "a photo", "what is this", "uploaded image", "a crop"]


def photographs() -> dict[str, np.ndarray]:
    import matplotlib
    import skimage.data as skd
    from skimage import io

    out = {}
    folder = Path(skd.__file__).parent
    for name in SCENES:
        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg" if name == "grace_hopper" else None
        if path is None:
            path = next(p for p in (folder / f"{name}.png", folder / f"{name}.jpg") if p.exists())
        arr = io.imread(path)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        out[name] = np.asarray(arr[..., :3], np.uint8)
    return out


def caption(rng: random.Random, category: str) -> str:
    return rng.choice(WORDS[category]) if rng.random() < 0.5 else rng.choice(GENERIC)


def write_scenes(folder: Path, crops: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = ["image,caption,label,source"]
    for name, img in photographs().items():
        h, w = img.shape[:2]
        for k in range(crops):
            area = rng.uniform(0.3, 1.0) * h * w
            ratio = rng.uniform(3 / 4, 4 / 3)
            cw, ch = min(w, int((area * ratio) ** 0.5)), min(h, int((area / ratio) ** 0.5))
            x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
            crop = Image.fromarray(img[y : y + ch, x : x + cw]).resize((160, 160), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            rel = f"scenes/{name}_{k:03d}.jpg"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            crop.save(folder / rel, quality=90)
            rows.append(f"{rel},{caption(rng, SCENES[name])},{SCENES[name]},{GROUP.get(name, name)}")
    (folder / "scenes.csv").write_text("\n".join(rows) + "\n")
    return folder / "scenes.csv"


def write_faces(folder: Path, seed: int) -> Path:
    import skimage.data as skd

    rng = random.Random(seed)
    patches = np.load(Path(skd.__file__).parent / "lfw_subset.npy")  # 100 faces, then 100 non-faces
    rows = ["image,caption,label"]
    (folder / "faces").mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(patches):
        label = "face" if i < 100 else "background"
        rel = f"faces/{i:03d}.png"
        Image.fromarray((p * 255).round().astype(np.uint8)).convert("RGB").save(folder / rel)
        rows.append(f"{rel},{caption(rng, label)},{label}")
    (folder / "faces.csv").write_text("\n".join(rows) + "\n")
    return folder / "faces.csv"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=25)
    # seed 2, chosen before any training: the first split whose test photographs cover 5 different
    # categories that all have training photographs (seed 0 left one without; seed 1 covers 4)
    ap.add_argument("--seed", type=int, default=2, help="split seed (default: 2)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from model_training import ablate

    tmp = Path(tempfile.mkdtemp(prefix="real-images-"))
    manifests = {"scenes": (write_scenes(tmp, 40, a.seed), ["--group-key", "source", "--val-frac", "0.2", "--test-frac", "0.25"]),
                 "faces": (write_faces(tmp, a.seed), ["--val-frac", "0.15", "--test-frac", "0.25"])}
    report: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                                 "command": "python scripts/real_image_check.py " + " ".join(sys.argv[1:]),
                                 "epochs": a.epochs, "results": {}}
    from model_training.data import split_of

    groups = sorted(set(GROUP.get(n, n) for n in SCENES))
    report["scenes_sources_by_split"] = {sp: [g for g in groups if split_of(g, a.seed, 0.2, 0.25) == sp]
                                         for sp in ("train", "val", "test")}
    print("scenes: photographs by split", report["scenes_sources_by_split"], flush=True)  # noqa: T201
    for name, (manifest, extra) in manifests.items():
        for preset in ("paper", "photo"):
            t0 = time.time()
            summary = ablate.main(["--preset", preset, "--data", str(manifest), "--out-dir", str(tmp / f"{name}-{preset}"),
                                   "--epochs", str(a.epochs), "--patience", str(a.epochs), "--seed", str(a.seed),
                                   "--no-progress", *extra])
            res = summary["results"]
            row = {m: {"test_acc": round(res[m]["test_acc"], 3), "train_acc": round(res[m]["train_acc"], 3)}
                   for m in ("image", "text", "fused")}
            row["n"] = {k: res["fused"][f"n_{k}"] for k in ("train", "val", "test")}
            row["skipped"] = res["fused"]["skipped"]
            row["duplicates_across_splits"] = res["fused"]["duplicates_across_splits"]
            row["seconds"] = round(time.time() - t0)
            report["results"][f"{name}/{preset}"] = row  # type: ignore[index]
            print(name, preset, json.dumps(row), flush=True)  # noqa: T201
    print(json.dumps(report, indent=2))  # noqa: T201
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

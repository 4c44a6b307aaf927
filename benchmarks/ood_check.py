"""Out-of-label photos against an artifact: how many the abstention flags, beside the test split it should not flag.

    pip install scikit-image            # its data folder ships the photographs (no download)
    python -m benchmarks.ood_check exported_models/default --out benchmarks/results/ood_default.json

Every photograph that ships in scikit-image (and matplotlib's Grace Hopper) is sent through the
service's own predictor (the artifact's temperature and OOD score, CPU), once with an empty
caption, once with a generic one ("a photo") and once with a caption naming one of the model's
own labels (a photo of a cat captioned "a tomato": the caption tries to pull it in). The artifact's
manifest says how many of its test split the same rule flags (measured at export).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

SKIP = {"chessboard_GRAY.png", "chessboard_RGB.png", "logo.png", "color.png", "phantom.png", "microaneurysms.png"}


def photographs() -> dict[str, bytes]:
    import matplotlib
    import skimage.data as skd

    folder = Path(skd.__file__).parent
    out = {p.stem: p.read_bytes() for p in sorted(folder.iterdir())
           if p.suffix in (".png", ".jpg") and p.name not in SKIP}
    out["grace_hopper"] = (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()
    return out


def check(model_dir: Path, min_confidence: float = 0.0) -> dict[str, Any]:
    from classifier_core.images import load_image
    from service.serving.session import Predictor
    from service.settings import Settings

    predictor = Predictor(Settings(model_dir=model_dir, provider="cpu", workers=1))
    predictor.load()
    manifest = predictor.manifest
    assert manifest is not None and predictor.text is not None
    photos = photographs()
    images = np.stack([load_image(b, manifest.image_size) for b in photos.values()])
    captions = {"empty": "", "generic": "a photo", "in-label": f"a {manifest.labels[0].replace('_', ' ')}"}
    result: dict[str, Any] = {"model": f"{manifest.name} {manifest.version}", "photos": len(photos),
                              "min_confidence": min_confidence, "by_caption": {}}
    for kind, caption in captions.items():
        preds = predictor.predict(images, predictor.encode([caption] * len(images)))
        reasons = [p.abstain_reason(min_confidence) for p in preds]
        result["by_caption"][kind] = {
            "caption": caption,
            "flagged_ood": sum(r == "out_of_distribution" for r in reasons),
            "abstained": sum(r is not None for r in reasons),
            "median_confidence": float(np.median([p.confidence for p in preds])),
            "per_photo": {name: {"label": manifest.labels[int(p.probabilities.argmax())], "confidence": round(p.confidence, 3),
                                 "ood_score": None if p.ood is None else round(p.ood, 2), "abstained": r}
                          for name, p, r in zip(photos, preds, reasons)},
        }
    ood = manifest.ood
    result["test_split_flagged_ood"] = (ood.get("flagged") or {}).get("test")
    result["ood_threshold_quantile"] = ood.get("quantile")
    result["temperature"] = manifest.temperature
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--min-confidence", type=float, default=0.0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    result = check(a.model_dir, a.min_confidence)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    result["command"] = "python -m benchmarks.ood_check " + " ".join(sys.argv[1:] if argv is None else argv)
    for kind, r in result["by_caption"].items():
        print(f"{kind:>9} caption {r['caption']!r:>14}: {r['flagged_ood']}/{result['photos']} photos flagged "  # noqa: T201
              f"out of distribution, {r['abstained']} abstained; median confidence {r['median_confidence']:.3f}")
    print(f"test split flagged (export): {result['test_split_flagged_ood']}")  # noqa: T201
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

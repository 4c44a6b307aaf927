"""The pretrained backbone: weights that really loaded (judged by what they predict), key mapping,
freezing, the feature cache, and export with the backbone in the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from classifier_core.artifact import load_manifest
from classifier_core.images import load_image
from model_training import backbone as bb
from model_training.checkpoint import read_checkpoint

PHOTOS = Path(__import__("skimage.data", fromlist=["x"]).__file__).parent  # scikit-image ships them (a dev dependency)
# ImageNet classes: 281-285 are cats (tabby, tiger cat, Persian, Siamese, Egyptian); 967-968 espresso, cup
EXPECTED = {"chelsea.png": range(281, 286), "coffee.png": range(967, 969)}


def _imagenet_probs(name: str, images: np.ndarray) -> torch.Tensor:
    model, _ = bb.load_pretrained(name, 224, with_imagenet_head=True)
    with torch.no_grad():
        return torch.softmax(model.classify(model.normalise(torch.from_numpy(images))), -1)


@pytest.mark.parametrize("name", sorted(bb.BACKBONES))
def test_imagenet_weights_see_a_cat_and_a_cup_of_coffee(name: str) -> None:
    """The serving preprocessing (load_image) + the backbone's own normalisation + its ImageNet head.

    Measured with EfficientNet-Lite0 at 224 px: the cat gets 0.95 of its probability on cat classes,
    the coffee 0.93 on cup/espresso. With BGR pixels the coffee falls to 0.70, with [0, 1] scaling to
    0.67, with a wrong key mapping to noise: the 0.85 bar catches each of them."""
    images = np.stack([load_image((PHOTOS / f).read_bytes(), 224) for f in EXPECTED])
    probs = _imagenet_probs(name, images)
    for row, (photo, classes) in enumerate(EXPECTED.items()):
        top = int(probs[row].argmax())
        mass = float(probs[row, classes.start : classes.stop].sum())
        assert top in classes, (name, photo, top)
        assert mass >= 0.85, (name, photo, mass)


def test_channel_order_and_scaling_would_be_caught() -> None:
    """The check above can fail: the same photos with BGR channels or [0, 1] scaling drop under the bar."""
    images = np.stack([load_image((PHOTOS / f).read_bytes(), 224) for f in EXPECTED])
    model, _ = bb.load_pretrained("efficientnet-lite0", 224, with_imagenet_head=True)
    with torch.no_grad():
        bgr = torch.softmax(model.classify(model.normalise(torch.from_numpy(images[..., ::-1].copy()))), -1)
        unit = torch.softmax(model.classify(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255), -1)
    assert float(bgr[1, 967:969].sum()) < 0.85 and float(unit[1, 967:969].sum()) < 0.85


def test_a_checkpoint_that_does_not_fit_names_its_keys(tmp_path: Path) -> None:
    raw = torch.load(bb.weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    body, head = bb.remap_state_dict(raw)
    assert "weight" in head and not any(k.startswith("_fc") or k.endswith("num_batches_tracked") for k in body)
    renamed = dict(raw)
    renamed["_blocks.3._bn1.gamma"] = renamed.pop("_blocks.3._bn1.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(bb.BackboneError, match=r"missing _blocks\.3\._bn1\.weight; unexpected _blocks\.3\._bn1\.gamma"):
        bb.load_pretrained("efficientnet-lite0", 64, tmp_path / "renamed.pth")
    with pytest.raises(bb.BackboneError, match="wrong shape"):  # lite0's weights are not lite2's
        bb.load_pretrained("efficientnet-lite2", 64, bb.weights_path("efficientnet-lite0"))
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(bb.BackboneError, match="not a PyTorch state dict"):
        bb.load_pretrained("efficientnet-lite0", 64, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="unknown backbone"):
        bb.spec_of("resnet50")


def _pretrained_backbone() -> dict[str, torch.Tensor]:
    model, _ = bb.load_pretrained("efficientnet-lite0", 32)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _backbone_of(ckpt: Path) -> dict[str, torch.Tensor]:
    sd = read_checkpoint(ckpt)["state_dict"]
    prefix = "image_encoder.backbone."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith("num_batches_tracked")}


def test_a_frozen_backbone_is_unchanged_after_an_epoch(tiny_data: Path, tmp_path: Path) -> None:
    """Frozen, with augmentation (so no cache: the images go through the backbone in train mode):
    weights and BatchNorm statistics stay the ImageNet ones, while the layers after it learn."""
    from model_training import train

    train.main(["--preset", "pretrained", "--data", str(tiny_data), "--out-dir", str(tmp_path / "run"), "--max-len", "8",
                "--model.image-size", "32", "--epochs", "1", "--augment", "true", "--threads", "2", "--no-progress"])
    assert not (tmp_path / "run" / "cache").exists()  # augmented: nothing to cache
    before, after = _pretrained_backbone(), _backbone_of(tmp_path / "run" / "last.pt")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    sd = read_checkpoint(tmp_path / "run" / "last.pt")["state_dict"]
    assert float(sd["image_encoder.fc.weight"].abs().sum()) > 0


def test_fine_tuning_trains_only_the_last_blocks(tiny_pretrained_run: Path) -> None:
    rows = [json.loads(x) for x in (tiny_pretrained_run / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 2]
    assert (tiny_pretrained_run / "cache" / "train-rank0of1" / "meta.json").is_file()  # phase 1 read cached features
    before, after = _pretrained_backbone(), _backbone_of(tiny_pretrained_run / "last.pt")
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("_blocks") else "")
               for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"_blocks.14", "_blocks.15", "_conv_head", "_bn1"}, changed
    # BatchNorm statistics are ImageNet's even in the blocks that learned
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k)


def test_feature_cache_reads_every_row_once_per_epoch_in_a_new_order(tmp_path: Path) -> None:
    from model_training.features import FILES, FeatureCache

    n, dim, length = 2600, 4, 3
    folder = tmp_path / "c"
    folder.mkdir()
    rows = {"pooled": np.repeat(np.arange(n, dtype=np.float16)[:, None], dim, 1) % 2048,
            "ids": np.ones((n, length), np.int32), "lengths": np.ones(n, np.int16),
            "targets": np.arange(n, dtype=np.int64), "digests": np.zeros(n, np.int64)}
    for name, dtype in FILES.items():
        (folder / f"{name}.bin").write_bytes(np.ascontiguousarray(rows[name], dtype).tobytes())
    cache = FeatureCache(folder, n, dim, length)
    orders = []
    for epoch in (1, 2):
        seen = np.concatenate([b["targets"].numpy() for b in cache.batches(32, epoch, shuffle=True)])
        assert sorted(seen.tolist()) == list(range(n))
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])
    plain = np.concatenate([b["targets"].numpy() for b in cache.batches(32)])
    assert plain.tolist() == list(range(n))
    assert all(b["ids"].shape[1] == 1 for b in cache.batches(32))  # trimmed to the longest caption


def test_export_with_the_backbone_in_the_graph(tiny_pretrained_artifact: Path) -> None:
    raw = json.loads((tiny_pretrained_artifact / "manifest.json").read_text())
    assert raw["parity"]["max"] <= 1e-4
    m = load_manifest(tiny_pretrained_artifact)
    assert m.backbone["name"] == "efficientnet-lite0" and m.backbone["licence"] == "Apache-2.0"
    assert m.backbone["weights_sha256"] == bb.sha256_of(bb.weights_path("efficientnet-lite0"))
    assert m.backbone["input_size"] == m.image_size == 32
    assert raw["serving"]["model_bytes"] > 10_000_000 and raw["serving"]["session_load_s"] > 0
    assert m.preprocessing["mean_px"] == [127.0] * 3


def test_the_feature_cache_key_follows_the_data_not_its_path(tmp_path: Path) -> None:
    """Images replaced in place (same names, same folder, same run) rebuild the cache; unchanged data
    reuses it; a table's images count too, wherever they are."""
    import os

    from PIL import Image

    from model_training.data import DataSpec
    from model_training.features import cache_key, data_fingerprint

    folder = tmp_path / "photos"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(folder / label / f"{i}.png")
    elsewhere = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(elsewhere)
    table = tmp_path / "table.csv"
    table.write_text(f"image,label\n{elsewhere},cat\n")

    def key(spec: DataSpec) -> str:
        return cache_key(spec, "train", 32, {}, "{}", 0, 1, None, data_fingerprint(spec))

    spec, tabled = DataSpec([str(folder)]), DataSpec([str(table)])
    before, before_table = key(spec), key(tabled)
    assert key(spec) == before  # nothing changed: the cache is reused
    stat = (folder / "cat" / "1.png").stat()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(folder / "cat" / "1.png")  # replaced in place
    os.utime(folder / "cat" / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # whatever its new size
    assert key(spec) != before
    Image.new("RGB", (8, 8), (0, 0, 200)).save(elsewhere)
    os.utime(elsewhere, ns=(7, 7))
    assert key(tabled) != before_table  # the table did not change; the image it names did

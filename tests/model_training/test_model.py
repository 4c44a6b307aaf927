from __future__ import annotations

import pytest
import torch

from model_training.model import MODES, FusedClassifier, InferenceWrapper, ModelConfig, build_model


def _model(mode: str) -> FusedClassifier:
    torch.manual_seed(0)
    return build_model(ModelConfig(mode=mode, num_classes=5, vocab_size=40, image_size=32, conv_channels=(8, 16),
                                   image_dim=16, embed_dim=8, hidden_dim=16, attn_dim=8))


def _inputs(n: int = 4, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    ids = torch.randint(3, 40, (n, length), generator=g)
    if n > 1:
        ids[1, 3:] = 0  # a padded row
    return img, ids


@pytest.mark.parametrize("mode", MODES)
def test_shapes_finite_and_gradients(mode: str) -> None:
    model = _model(mode).train()
    img, ids = _inputs()
    logits, attn = model(img, ids)
    assert logits.shape == (4, 5) and attn.shape == (4, 6)
    assert torch.isfinite(logits).all() and torch.isfinite(attn).all()
    logits.sum().backward()
    branches = {"image": [model.image_encoder], "text": [model.text_encoder], "fused": [model.image_encoder, model.text_encoder]}[mode]
    for branch in branches:
        assert branch is not None
        grads = [p.grad for p in branch.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert model.head.weight.grad is not None and float(model.head.weight.grad.abs().sum()) > 0


def test_attention_is_a_distribution_over_real_tokens() -> None:
    model = _model("fused").eval()
    img, ids = _inputs()
    _, attn = model(img, ids)
    assert torch.allclose(attn.sum(-1), torch.ones(4), atol=1e-5)
    assert float(attn[1, 3:].detach().abs().sum()) == 0.0  # padded steps get no weight


def test_all_pad_row_gives_zeros_not_nan() -> None:
    model = _model("text").eval()
    img, ids = _inputs(2, 5)
    ids[0] = 0
    logits, attn = model(img, ids)
    assert torch.isfinite(logits).all()
    assert float(attn[0].detach().abs().sum()) == 0.0


@pytest.mark.parametrize("mode", ["text", "fused"])
def test_padding_never_changes_a_prediction(mode: str) -> None:
    model = InferenceWrapper(_model(mode)).eval()
    img, _ = _inputs(1)
    caption = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        base, base_attn = model(img, caption)
        for extra in (1, 5, 40):
            padded = torch.cat([caption, torch.zeros(1, extra, dtype=torch.long)], dim=1)
            probs, attn = model(img, padded)
            assert torch.allclose(probs, base, atol=1e-6)
            assert torch.allclose(attn[:, :4], base_attn, atol=1e-6)


def test_modes_read_only_their_inputs() -> None:
    img, ids = _inputs()
    other_img = torch.zeros_like(img)
    other_ids = torch.full_like(ids, 7)
    with torch.no_grad():
        text_model = _model("text").eval()
        assert torch.equal(text_model(img, ids)[0], text_model(other_img, ids)[0])
        image_model = _model("image").eval()
        assert torch.equal(image_model(img, ids)[0], image_model(img, other_ids)[0])
        fused = _model("fused").eval()
        assert not torch.equal(fused(img, ids)[0], fused(other_img, ids)[0])
        assert not torch.equal(fused(img, ids)[0], fused(img, other_ids)[0])


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        ModelConfig(mode="audio")

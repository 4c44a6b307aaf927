from __future__ import annotations

from collections import Counter

from model_training.synthetic import CLASSES, GeneratorConfig, generate


def test_generator_is_deterministic_by_seed() -> None:
    a = list(generate(GeneratorConfig(seed=5, num_samples=20)))
    b = list(generate(GeneratorConfig(seed=5, num_samples=20)))
    c = list(generate(GeneratorConfig(seed=6, num_samples=20)))
    assert [(x[1], x[2]) for x in a] == [(x[1], x[2]) for x in b]
    assert [x[2] for x in a] != [x[2] for x in c]


def test_captions_are_mixed_informative_and_not() -> None:
    cfg = GeneratorConfig(seed=1, num_samples=400)
    samples = list(generate(cfg))
    labels = Counter(m["label"] for *_, m in samples)
    assert set(labels) == set(CLASSES)
    empty = sum(1 for _, _, cap, _ in samples if cap == "")
    assert empty > 0  # some captions carry nothing at all
    assert len({cap for _, _, cap, _ in samples}) > 300

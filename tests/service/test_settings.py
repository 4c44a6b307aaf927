"""Settings: described in the model itself, documented in docs/configuration.md, resolved once."""

from __future__ import annotations

import os
import re

import pytest
from helpers import ROOT

from service.settings import Settings


def test_every_setting_is_described_and_documented() -> None:
    undescribed = [name for name, f in Settings.model_fields.items() if not (f.description or "").strip()]
    assert not undescribed
    doc = (ROOT / "docs" / "configuration.md").read_text()
    names = {f"CLASSIFIER_{name.upper()}" for name in Settings.model_fields}
    documented = set(re.findall(r"CLASSIFIER_[A-Z_]+[A-Z]", doc))
    assert names - documented == set(), "settings missing from docs/configuration.md"
    assert documented - names == set(), "docs/configuration.md names settings that do not exist"


def test_automatic_values_are_resolved_once_for_the_machine() -> None:
    cores = os.cpu_count() or 1
    r = Settings(workers=0, intra_op_threads=0, decode_threads=0, owner_threads=0, inline_decode_bytes=-1).resolved()
    assert (r.workers, r.decode_threads, r.owner_threads) == (cores, cores, cores)
    assert r.intra_op_threads == max(1, cores // cores) and r.lone_threads == cores
    assert r.inline_decode_bytes in (0, 128 * 1024) and r.is_resolved
    one = Settings().resolved(processes=1)  # one process (an embedded app, a test client): it gets every core
    assert one.workers == 1 and one.intra_op_threads == cores
    kept = Settings(workers=3, intra_op_threads=5, decode_threads=7, inline_decode_bytes=99, lone_threads=1).resolved()
    assert (kept.workers, kept.intra_op_threads, kept.decode_threads, kept.inline_decode_bytes, kept.lone_threads) == \
        (3, 5, 7, 99, 1)
    assert kept.resolved() == kept  # idempotent
    with pytest.raises(ValueError):
        Settings(workers=-1)

"""The prepared dataset at one training size, cached beside it: what a run loads, in seconds."""

from __future__ import annotations

import numpy as np

from mammacls.data import resized
from mammacls.data.dedup import perceptual_hash, phash_to_hex
from mammacls.data.prepared import load_prepared
from mammacls.inference.images import resize_square


def test_the_cache_holds_what_resizing_gives_and_is_reused(prepared, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared[0], copy, ignore=shutil.ignore_patterns(resized.RESIZED_DIR))
    dataset = load_prepared(copy)
    first = resized.resized_images(dataset, 40)
    assert (copy / resized.RESIZED_DIR / "40" / "index.json").is_file()
    for k in (0, len(dataset.rows) // 2, len(dataset.rows) - 1):
        row = dataset.rows[k]
        assert np.array_equal(first.images[k], resize_square(dataset.load_image(row), 40))
        assert first.phashes[k] == phash_to_hex(perceptual_hash(dataset.load_image(row)))
    with_mask = next(k for k, row in enumerate(dataset.rows) if row.get("mask_file") and row["label"] != "normal")
    expected = resize_square(dataset.load_mask(dataset.rows[with_mask]) * np.uint8(255), 40) >= 128
    assert np.array_equal(first.masks(np.array([with_mask]))[0], expected) and expected.any()

    def never(*_args):
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setattr(resized, "_build", never)
    again = resized.resized_images(load_prepared(copy), 40)
    assert np.array_equal(np.asarray(again.images), first.images) and again.phashes == first.phashes
    monkeypatch.undo()
    # another manifest (a dataset prepared again) does not reuse a stale cache
    index = copy / resized.RESIZED_DIR / "40" / "index.json"
    index.write_text(index.read_text().replace(dataset.manifest_sha256, "0" * 64))
    calls = []
    real_build = resized._build
    monkeypatch.setattr(resized, "_build", lambda *a: calls.append(1) or real_build(*a))
    resized.resized_images(load_prepared(copy), 40)
    assert calls == [1]


def test_a_cache_that_cannot_be_written_is_only_a_slower_start(prepared, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared[0], copy, ignore=shutil.ignore_patterns(resized.RESIZED_DIR))

    def full_disk(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resized, "_write", full_disk)
    warnings = []
    result = resized.resized_images(load_prepared(copy), 36, warn=warnings.append)
    assert result.images.shape[1:] == (36, 36) and len(result.images) == len(load_prepared(copy).rows)
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert not (copy / resized.RESIZED_DIR / "36" / "index.json").exists()

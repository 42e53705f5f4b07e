import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mammacls.data.dedup import near_duplicate_pairs, perceptual_hash, thumbnail_vector
from mammacls.data.prepare import PrepareOptions, prepare_dataset, split_by_group
from mammacls.data.sources import scan_dataset
from mammacls.data.prepared import load_prepared
from mammacls.errors import MammaclsError
from tests.conftest import IMAGES_PER_CLASS, build_busi_fixture, real_busi_or_skip


def _manifest(prepared_dir: Path) -> list[dict]:
    return load_prepared(prepared_dir).rows  # paths resolved against their source


def _by_rel(rows, root: Path) -> dict[str, dict]:
    return {Path(r["path"]).relative_to(root.resolve()).as_posix(): r for r in rows}


def test_scan_attaches_masks_and_never_treats_them_as_images(busi_dir):
    root, _ = busi_dir
    scan = scan_dataset(root)
    names = [r.relpath for r in scan.records]
    assert not any("_mask" in n for n in names)
    benign1 = next(r for r in scan.records if r.relpath == "benign/benign (1).png")
    assert [m.name for m in benign1.mask_paths] == ["benign (1)_mask.png", "benign (1)_mask_1.png"]
    assert scan.non_image_files == 1
    assert len(scan.records) == 3 * IMAGES_PER_CLASS + 4  # + exact dup, near dup, conflict copy, corrupt


def test_prepare_summary_groups_conflicts_and_skips(prepared, busi_dir):
    prepared_dir, summary = prepared
    root, planted = busi_dir
    rows = _by_rel(_manifest(prepared_dir), root)
    assert {"path", "label", "split", "group_id", "sha256", "mask_paths"} <= set(next(iter(rows.values())))
    a, b = planted["exact"]
    assert rows[a]["group_id"] == rows[b]["group_id"]
    assert rows[a]["sha256"] == rows[b]["sha256"]
    a, c = planted["near"]
    assert rows[a]["group_id"] == rows[c]["group_id"]
    # the conflict (same image as benign and malignant) is reported and left out
    assert summary["conflicts"] == 1
    assert all(p not in rows for p in planted["conflict"])
    assert {m["path"] for m in summary["conflict_groups"][0]["members"]} == set(planted["conflict"])
    assert [Path(s["path"]).name for s in summary["skipped"]] == ["benign (104).png"]
    assert "cannot decode" in summary["skipped"][0]["reason"] or "not an image" in summary["skipped"][0]["reason"]
    assert summary["duplicate_groups"] >= 1
    assert (prepared_dir / "overview.png").stat().st_size > 10_000
    mask_row = rows["benign/benign (1).png"]
    assert len(mask_row["mask_paths"].split(";")) == 2


def test_no_group_straddles_splits_and_every_split_has_every_class(prepared):
    rows = _manifest(prepared[0])
    split_of_group: dict[str, set] = {}
    for r in rows:
        split_of_group.setdefault(r["group_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_group.values())
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == {"benign", "malignant", "normal"}


def test_cached_decoded_copy_is_grayscale_and_matches_source(prepared):
    dataset = load_prepared(prepared[0])
    row = dataset.rows[0]
    cached = dataset.load_image(row)
    assert cached.dtype == np.uint8 and cached.ndim == 2
    source = np.array(Image.open(row["path"]).convert("L"))
    assert np.array_equal(cached, source)
    mask = dataset.load_mask(row)
    assert mask.shape == cached.shape and set(np.unique(mask)) <= {0, 1}


def test_split_is_deterministic_and_seed_dependent(busi_dir, tmp_path, cache):
    root, _ = busi_dir
    first = prepare_dataset(root, out=tmp_path / "a", options=PrepareOptions(seed=7))
    second = prepare_dataset(root, out=tmp_path / "b", options=PrepareOptions(seed=7))
    other = prepare_dataset(root, out=tmp_path / "c", options=PrepareOptions(seed=8))
    splits = lambda d: [(Path(r["path"]).name, r["split"]) for r in _manifest(d)]  # noqa: E731
    assert splits(tmp_path / "a") == splits(tmp_path / "b")
    assert splits(tmp_path / "a") != splits(tmp_path / "c")
    assert first["manifest_sha256"] == second["manifest_sha256"]
    assert other["counts"]["total"]["total"] == first["counts"]["total"]["total"]


def test_keep_conflicts_keeps_them_in_one_split(busi_dir, tmp_path, cache):
    root, planted = busi_dir
    prepare_dataset(root, out=tmp_path / "kept", options=PrepareOptions(keep_conflicts=True))
    rows = _by_rel(_manifest(tmp_path / "kept"), root)
    a, b = planted["conflict"]
    assert rows[a]["split"] == rows[b]["split"] and rows[a]["label"] != rows[b]["label"]


def test_groups_csv_merges_published_groups(busi_dir, tmp_path, cache):
    root, _ = busi_dir
    groups = tmp_path / "groups.csv"
    groups.write_text("path,group_id\n"
                      "Dataset_BUSI_with_GT/normal/normal (5).png,G1\n"
                      "Dataset_BUSI_with_GT/normal/normal (9).png,G1\n"
                      "Dataset_BUSI_with_GT/normal/normal (999).png,G2\n")
    summary = prepare_dataset(root, out=tmp_path / "p", options=PrepareOptions(groups_csv=groups))
    rows = _by_rel(_manifest(tmp_path / "p"), root)
    assert rows["normal/normal (5).png"]["group_id"] == rows["normal/normal (9).png"]["group_id"]
    assert summary["duplicate_links"]["csv_unmatched"] == 1


@pytest.mark.parametrize("content, message", [
    ("name,group\na,b\n", "needs the columns path,group_id"),
    ("path,group_id\nnowhere/x.png,G\n", "no row of the groups CSV"),
])
def test_bad_groups_csv_is_a_clear_error(busi_dir, tmp_path, cache, content, message):
    groups = tmp_path / "g.csv"
    groups.write_text(content)
    with pytest.raises(MammaclsError, match=message):
        prepare_dataset(busi_dir[0], out=tmp_path / "p", options=PrepareOptions(groups_csv=groups))
    assert not (tmp_path / "p").exists()


def test_folder_without_class_folders_or_images_is_an_error(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MammaclsError, match="no class folders"):
        prepare_dataset(tmp_path / "empty")
    (tmp_path / "noimg" / "benign").mkdir(parents=True)
    (tmp_path / "noimg" / "benign" / "readme.txt").write_text("x")
    with pytest.raises(MammaclsError, match="no images found"):
        prepare_dataset(tmp_path / "noimg")
    with pytest.raises(MammaclsError, match="not found"):
        prepare_dataset(tmp_path / "missing")


def test_refuses_to_overwrite_a_foreign_output_folder(busi_dir, tmp_path, cache):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(MammaclsError, match="not a prepared dataset"):
        prepare_dataset(busi_dir[0], out=out)
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_split_by_group_keeps_ratios():
    rng = np.random.default_rng(0)
    labels = list(rng.choice(["benign", "malignant", "normal"], p=[0.55, 0.28, 0.17], size=600))
    groups = [f"g{i // 2}" for i in range(600)]  # pairs of duplicates
    split = split_by_group(labels, groups, 0.15, 0.15, seed=1)
    for s, expected in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        share = sum(x == s for x in split) / len(split)
        assert abs(share - expected) < 0.03
        of = [lab for lab, x in zip(labels, split) if x == s]
        assert abs(of.count("malignant") / len(of) - labels.count("malignant") / 600) < 0.04
    for g in set(groups):
        assert len({x for x, gg in zip(split, groups) if gg == g}) == 1


def test_near_duplicate_rule_separates_unrelated_images():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, size=(60, 80)).astype(np.uint8)
    near = np.clip(base.astype(int) + rng.integers(-4, 5, size=base.shape), 0, 255).astype(np.uint8)
    others = [rng.integers(0, 255, size=(60, 80)).astype(np.uint8) for _ in range(5)]
    images = [base, near, *others]
    pairs = near_duplicate_pairs(np.stack([perceptual_hash(i) for i in images]),
                                 np.stack([thumbnail_vector(i) for i in images]))
    assert pairs == [(0, 1)]


@pytest.mark.slow
@pytest.mark.realdata
def test_real_busi_prepare_counts_and_duplicate_recall(real_busi_prepared):
    root = real_busi_or_skip()
    summary = real_busi_prepared[1]
    assert summary["images_found"] == 780
    found = Counter_of(scan_dataset(root).records)
    assert found == {"benign": 437, "malignant": 210, "normal": 133}
    assert summary["masks_attached"] == 798 and summary["images_with_masks"] == 780
    assert summary["skipped"] == []
    # recall of our detector against the published grouping (Pawłowska et al. 2023)
    published = root.parent / "busi_groups.csv"
    if published.is_file():
        with open(published, newline="") as handle:
            truth = {r["path"].split("/", 1)[1]: r["group_id"] for r in csv.DictReader(handle)}
        ours = {m: g for g, ms in summary["duplicate_group_members"].items() for m in ms}
        paths = sorted(truth)
        true_pairs = {(a, b) for i, a in enumerate(paths) for b in paths[i + 1:] if truth[a] == truth[b]}
        found_pairs = {(a, b) for (a, b) in true_pairs if a in ours and ours.get(a) == ours.get(b)}
        assert len(true_pairs) == 254
        assert len(found_pairs) / len(true_pairs) >= 0.90
        # every conflict group we report is a cross-class group of the published list
        assert summary["conflicts"] == 8
    assert summary["counts"]["total"]["test"] >= 100
    json.dumps(summary)


def Counter_of(records) -> dict:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.label] = counts.get(r.label, 0) + 1
    return counts


def test_fixture_builder_is_reproducible(tmp_path):
    a = build_busi_fixture(tmp_path / "a", seed=5)
    b = build_busi_fixture(tmp_path / "b", seed=5)
    assert a == b
    img = "benign/benign (7).png"
    assert (tmp_path / "a" / img).read_bytes() == (tmp_path / "b" / img).read_bytes()


def test_manifest_paths_are_relative_so_a_prepared_dataset_can_move(prepared, tmp_path):
    """manifest.csv names each image relative to its source; loading resolves it, and a copy of the
    prepared folder elsewhere loads the same rows and cached images."""
    prepared_dir = prepared[0]
    with open(prepared_dir / "manifest.csv", newline="", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle))
    assert all(not Path(r["path"]).is_absolute() for r in raw)
    assert all(not Path(m).is_absolute() for r in raw for m in r["mask_paths"].split(";") if m)
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(prepared_dir, moved)
    here, there = load_prepared(prepared_dir), load_prepared(moved)
    assert [r["path"] for r in here.rows] == [r["path"] for r in there.rows]
    assert all(Path(r["path"]).is_file() for r in there.rows)
    assert here.manifest_sha256 == there.manifest_sha256
    assert np.array_equal(here.load_image(here.rows[0]), there.load_image(there.rows[0]))


def test_manifest_rows_have_exactly_the_typed_columns(prepared):
    """The manifest is written in ManifestRow's column order and read back with exactly its keys."""
    from mammacls.data.prepared import ManifestRow

    with open(prepared[0] / "manifest.csv", newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == tuple(ManifestRow.__annotations__)
    rows = load_prepared(prepared[0]).rows
    assert rows and all(set(row) == set(ManifestRow.__annotations__) for row in rows)
    assert all(int(row["width"]) > 0 and int(row["height"]) > 0 for row in rows)

import json

import pytest

from edgedistill.artifacts import Artifact, Manifest, atomic_dir, atomic_path, atomic_write_json, sha256_file


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-written")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_dir_replaces_whole_or_nothing(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("crash")
    assert sorted(p.name for p in d.iterdir()) == ["a"]
    with atomic_dir(d) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_manifest_freshness_tracks_inputs_and_files(tmp_path):
    m = Manifest(tmp_path)
    (tmp_path / "s").mkdir()
    f = tmp_path / "s" / "w.bin"
    f.write_bytes(b"abc")
    m.record("stage", "h1", 1.0, Artifact([tmp_path / "s"], {"x": 1}))
    rec = json.loads((tmp_path / "manifest.json").read_text())["stages"]["stage"]
    assert rec["outputs"] == [{"path": "s/w.bin", "sha256": sha256_file(f), "bytes": 3}]
    m2 = Manifest(tmp_path)
    assert m2.is_fresh("stage", "h1") and not m2.is_fresh("stage", "h2")
    f.write_bytes(b"abd")  # same size, other content
    assert not m2.is_fresh("stage", "h1")


def test_corrupt_manifest_is_reported(tmp_path):
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(Exception, match="not valid JSON"):
        Manifest(tmp_path)


def test_atomic_write_json_roundtrip(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}

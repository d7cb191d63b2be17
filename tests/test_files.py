"""polyak.files: atomic writes, all-or-none outputs, and the checks on names read back."""

from __future__ import annotations

import os

import pytest

import polyak
from polyak import files


def test_atomic_write_failing_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    files.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        files.write_json_atomic(path, {"a": object()})  # json.dump fails halfway
    assert files.read_json(path) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_outputs_replace_all_or_none_when_a_rename_fails(tmp_path, monkeypatch):
    for name in "abc":
        (tmp_path / name).write_text("old")
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # a's backup, a, b's backup, then b's rename fails
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space"), files.Outputs() as out:
        for name in "abc":
            out.stage(tmp_path / name).write_text("new")
        out.commit()
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == dict.fromkeys("abc", "old")


def test_outputs_failing_before_the_commit_leave_nothing(tmp_path):
    (tmp_path / "a").write_text("old")
    with pytest.raises(RuntimeError), files.Outputs() as out:
        out.stage(tmp_path / "a").write_text("new")
        out.stage(tmp_path / "b").write_text("new")
        raise RuntimeError("the second output could not be computed")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a": "old"}


def test_outputs_refuse_a_directory_before_writing(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"), files.Outputs() as out:
        out.stage(tmp_path / "d")


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "a\0b", 3, None, ["x"]]
)
def test_names_that_are_not_plain_are_refused_by_name(name):
    with pytest.raises(polyak.CheckpointError, match=r"manifest.json: files\[0\]"):
        files.plain_name(name, what="files[0]", where="manifest.json")


def test_a_name_must_match_the_writers_pattern():
    assert files.plain_name("0001.bin", what="f", where="m", pattern=r"\d+\.bin") == "0001.bin"
    with pytest.raises(polyak.CheckpointError, match="is not of the form"):
        files.plain_name("x.bin", what="f", where="m", pattern=r"\d+\.bin")


def test_regular_file_refuses_what_leaves_the_folder_or_is_not_a_file(tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.write_text("secret")
    (store / "ok").write_text("x")
    (store / "link-out").symlink_to(outside)
    (store / "link-in").symlink_to(store / "ok")
    (store / "dir").mkdir()
    os.mkfifo(store / "fifo")
    assert files.regular_file(store, "ok") == store / "ok"
    assert files.regular_file(store, "link-in") == store / "link-in"
    for name in ("link-out", "dir", "fifo"):
        with pytest.raises(polyak.CheckpointError, match=name):
            files.regular_file(store, name)
    with pytest.raises(FileNotFoundError):
        files.regular_file(store, "missing")


def test_read_json_is_bounded_and_names_the_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("[" * 100 + "]" * 100)
    assert files.read_json(path) is not None
    with pytest.raises(polyak.CheckpointError, match="more than 10"):
        files.read_json(path, max_bytes=10)
    path.write_text('{"a": ')
    with pytest.raises(polyak.CheckpointError, match="m.json is not valid JSON"):
        files.read_json(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(polyak.CheckpointError, match="not valid JSON"):
        files.read_json(path)
    with pytest.raises(polyak.CheckpointError, match="not a regular file"):
        files.read_json(tmp_path)
    with pytest.raises(LookupError, match="none here"):
        files.read_json(tmp_path / "no.json", missing=lambda p: LookupError(f"none here: {p}"))

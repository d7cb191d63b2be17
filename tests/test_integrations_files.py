"""The Hugging Face callback's EMA files read back as untrusted input (no Trainer run here: the
reader and writer of ``polyak.integrations._ema_files`` directly).

Each test names the rule it pins; each failed on the reader before these rules (it read and
loaded files outside the folder, gave raw KeyError / IndexError / TypeError /
FileNotFoundError, read a JSON of any size, or deleted a user's file by glob).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

import polyak
from polyak.errors import CheckpointError
from polyak.integrations._ema_files import JSON_NAME, read_ema_files, save_ema_files

RUN = uuid.uuid4().hex


def _ema() -> polyak.EMA:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = polyak.EMA(model, {"slow": 0.9, "fast": 0.5})
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    return ema


@pytest.fixture
def folder(tmp_path):
    """``checkpoint-3`` with valid EMA files, beside a valid copy of its tensor file."""
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    save_ema_files(folder, _ema().state_dict(), run=RUN, global_step=3)
    (tmp_path / "outside.safetensors").write_bytes((folder / _meta(folder)["tensors"]).read_bytes())
    return folder


def _meta(folder: Path) -> dict:
    return json.loads((folder / JSON_NAME).read_text())


def _edit(folder: Path, **fields) -> None:
    meta = _meta(folder)
    for key, value in fields.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (folder / JSON_NAME).write_text(json.dumps(meta))


def _rewrite_tensors(folder: Path, tensors: dict) -> None:
    """New tensor file content under the name, size and checksum the JSON then records."""
    data = save_tensors(tensors)
    digest = hashlib.sha256(data).hexdigest()
    (folder / _meta(folder)["tensors"]).unlink()
    name = f"polyak_ema.{digest[:16]}.safetensors"
    (folder / name).write_bytes(data)
    _edit(folder, tensors=name, bytes=len(data), sha256=digest)


def test_a_save_reads_back_as_it_was(folder):
    saved = read_ema_files(folder)
    ema = _ema()
    assert (saved.run, saved.global_step, saved.path) == (RUN, 3, folder / JSON_NAME)
    for name in ema.names:
        table = {**saved.state["averages"][name], **saved.state["copied"]}
        assert table.keys() == ema.averaged_tensors(name).keys()
        for k, v in ema.averaged_tensors(name).items():
            assert torch.equal(table[k], v), (name, k)
    fresh = polyak.EMA(
        nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), {"slow": 0.9, "fast": 0.5}
    )
    fresh.load_state_dict(saved.state)
    assert (fresh.step, fresh.timeline.num_updates) == (1, 1)


@pytest.mark.parametrize("kind", ["parent", "absolute"])
def test_a_tensor_file_name_leaving_the_folder_is_refused(folder, kind):
    """``../x`` or an absolute path (here to a valid copy of the file, checksum and all)."""
    outside = folder.parent / "outside.safetensors"
    _edit(folder, tensors="../outside.safetensors" if kind == "parent" else str(outside))
    with pytest.raises(CheckpointError, match=r"the field 'tensors' .* is not a plain file name"):
        read_ema_files(folder)


def test_a_symlink_leaving_the_folder_is_refused(folder):
    name = _meta(folder)["tensors"]
    (folder / name).unlink()
    (folder / name).symlink_to(folder.parent / "outside.safetensors")  # same bytes, same hash
    with pytest.raises(CheckpointError, match=r"is a symlink to .*outside.safetensors, outside"):
        read_ema_files(folder)
    (folder / JSON_NAME).rename(folder.parent / "outside.json")
    (folder / JSON_NAME).symlink_to(folder.parent / "outside.json")
    with pytest.raises(CheckpointError, match=r"polyak_ema.json is a symlink to .*outside.json"):
        read_ema_files(folder)


@pytest.mark.parametrize("special", ["device", "fifo", "directory"])
def test_a_device_fifo_or_directory_is_refused_without_reading(folder, special):
    """A link to a character device (``/dev/zero`` would be read forever; ``os.devnull`` is the
    one every system has), a fifo, a directory: refused by kind, before a byte is read."""
    name = _meta(folder)["tensors"]
    (folder / name).unlink()
    if special == "fifo":
        os.mkfifo(folder / name)  # opening it for reading would wait for a writer forever
    elif special == "directory":
        (folder / name).mkdir()
    else:
        assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
        (folder / name).symlink_to(os.devnull)
    with pytest.raises(CheckpointError, match=r"is not a regular file; refusing to read it"):
        read_ema_files(folder)
    _edit(folder, tensors="/dev/zero")
    with pytest.raises(CheckpointError, match="is not a plain file name"):
        read_ema_files(folder)


def test_a_name_of_another_pattern_is_refused(folder):
    for name in ["model.safetensors", "polyak_ema.json", "polyak_ema.XYZ.safetensors"]:
        _edit(folder, tensors=name)
        with pytest.raises(CheckpointError, match=r"is not of the form polyak_ema"):
            read_ema_files(folder)


def test_the_json_is_read_bounded(folder):
    """A JSON beyond 4 MiB (valid, padded with spaces) is refused before it is parsed."""
    raw = (folder / JSON_NAME).read_bytes()
    (folder / JSON_NAME).write_bytes(raw[:-1] + b" " * (4 << 20) + raw[-1:])
    with pytest.raises(CheckpointError, match=r"polyak_ema.json is \d+ bytes, more than 4194304"):
        read_ema_files(folder)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"tensors": None}, r"the fields \['tensors'\] are missing"),
        ({"extra": 1}, r"\['extra'\] unknown"),
        ({"averages": 5}, "the field 'averages' must be a list, got 5"),
        ({"averages": [1, 2]}, r"'averages\[0\]' must be a string, got 1"),
        ({"averages": ["slow", "slow"]}, "must name each average once"),
        ({"averages": []}, "must name each average once"),
        ({"global_step": "3"}, "the field 'global_step' must be an int, got '3'"),
        ({"global_step": -3}, "the field 'global_step' is negative"),
        ({"global_step": True}, "the field 'global_step' must be an int, got True"),
        ({"bytes": 1.5}, "the field 'bytes' must be an int"),
        ({"run": "run-1"}, r"the field 'run' must be a string of the form \[0-9a-f\]\{32\}"),
        ({"sha256": 7}, "the field 'sha256' must be a string"),
        ({"version": 1}, "not a 'polyak.EMA files' file of version 2"),
        ({"format": None}, "not a 'polyak.EMA files' file"),
        ({"state": []}, "the field 'state' must be an object"),
        ({"state": {"format": "polyak.EMA"}}, r"the field 'state.version' is missing"),
        (
            {"state": {"format": "x", "version": 1, "dtype": "f", "timeline": {}, "shards": {}}},
            r"'state' holds unknown fields \['shards'\]",
        ),
        ({"tensors": 3}, "the field 'tensors' must be a string"),
        ({"tensors": "polyak_ema.0123456789abcdef.safetensors"}, "does not carry the start of"),
    ],
)
def test_a_hand_edited_json_is_a_named_error(folder, fields, match):
    _edit(folder, **fields)
    with pytest.raises(CheckpointError, match=rf"^{folder / JSON_NAME}: .*{match}"):
        read_ema_files(folder)


def test_not_json_or_not_an_object_is_a_named_error(folder):
    for raw in [b"{", b"\xff\xfe", b"[1, 2]", b'"x"', b"[" * 100_000]:
        (folder / JSON_NAME).write_bytes(raw)
        with pytest.raises(CheckpointError, match=rf"{JSON_NAME}"):
            read_ema_files(folder)


def test_missing_files_are_named(folder):
    name = _meta(folder)["tensors"]
    (folder / name).unlink()
    with pytest.raises(CheckpointError, match=rf"{name}, named by the field 'tensors' .* missing"):
        read_ema_files(folder)
    (folder / JSON_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"{JSON_NAME} is missing: .* holds no polyak EMA"):
        read_ema_files(folder)


def test_the_size_is_checked_before_reading_and_the_checksum_after(folder):
    name = _meta(folder)["tensors"]
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data + b"\0")
    with pytest.raises(CheckpointError, match=rf"is not a regular file of {len(data)} bytes"):
        read_ema_files(folder)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    (folder / name).write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"does not match the field 'sha256'"):
        read_ema_files(folder)


@pytest.mark.parametrize(
    "key",
    [
        "average/2/0.weight",  # index out of range (2 averages)
        "average/99999999999/0.weight",
        "average/01/0.weight",  # not the writer's form of an index
        "average/-1/0.weight",
        "other/0.weight",  # an unknown kind
        "average/0.weight",
        "copied",
        "copied/",
    ],
)
def test_tensor_keys_are_parsed_strictly(folder, key):
    tensors = load_tensors((folder / _meta(folder)["tensors"]).read_bytes())
    tensors[key] = torch.zeros(2)
    _rewrite_tensors(folder, tensors)
    with pytest.raises(CheckpointError, match=r"the tensor key .* is not 'average/<i>/<name>'"):
        read_ema_files(folder)


def test_a_damaged_safetensors_file_with_a_matching_checksum_is_a_named_error(folder):
    data = b"\xff" * 8 + b"{}"
    digest = hashlib.sha256(data).hexdigest()
    (folder / _meta(folder)["tensors"]).unlink()
    name = f"polyak_ema.{digest[:16]}.safetensors"
    (folder / name).write_bytes(data)
    _edit(folder, tensors=name, bytes=len(data), sha256=digest)
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        read_ema_files(folder)


def test_a_save_removes_only_its_own_old_tensor_files(folder):
    """Old tensor files go; a user's file that merely starts like them, a directory of the
    pattern, and what a symlink of the pattern points to stay."""
    outside = folder.parent / "outside.safetensors"
    before = outside.read_bytes()
    old = _meta(folder)["tensors"]
    keep = ["polyak_ema.notes.safetensors", "polyak_ema.0123456789ABCDEF.safetensors", "x"]
    for name in keep:
        (folder / name).write_text("mine")
    (folder / "polyak_ema.00000000000000aa.safetensors").mkdir()
    (folder / "polyak_ema.00000000000000bb.safetensors").symlink_to(outside)
    ema = _ema()
    ema.update()
    save_ema_files(folder, ema.state_dict(), run=RUN, global_step=4)
    new = _meta(folder)["tensors"]
    assert new != old and not (folder / old).exists()
    assert not (folder / "polyak_ema.00000000000000bb.safetensors").is_symlink()  # the link
    assert outside.read_bytes() == before  # not its target
    assert (folder / "polyak_ema.00000000000000aa.safetensors").is_dir()
    assert all((folder / name).read_text() == "mine" for name in keep)
    assert read_ema_files(folder).global_step == 4


def test_the_writer_refuses_an_identity_it_could_not_read_back(tmp_path):
    state = _ema().state_dict()
    with pytest.raises(ValueError, match="run must be 32 lowercase hex digits"):
        save_ema_files(tmp_path, state, run="run-1", global_step=0)
    with pytest.raises(ValueError, match="global_step must be an int >= 0"):
        save_ema_files(tmp_path, state, run=RUN, global_step=-1)
    assert list(tmp_path.iterdir()) == []

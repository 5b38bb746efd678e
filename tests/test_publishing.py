"""`write_atomically` and `replace_folder`: a folder that is replaced keeps what it held unless its replacement is in
place, whichever rename fails."""

import os

import pytest

from m2bert_hf_mlx.errors import OutputFileError
from m2bert_hf_mlx.publishing import (
    leftover_target,
    partial_folders,
    replace_folder,
    set_aside_folders,
    write_atomically,
)


def write_file(text):
    return lambda folder: (folder / "file.txt").write_text(text)


def contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def failing_rename(monkeypatch, fails):
    """os.rename (which Path.rename calls) failing for the (source, destination) pairs that `fails` picks."""
    rename = os.rename

    def maybe_failing(src, dst):
        if fails(os.fspath(src), os.fspath(dst)):
            raise PermissionError(13, "Permission denied")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", maybe_failing)


@pytest.fixture
def target(tmp_path):
    folder = tmp_path / "out"
    write_atomically(folder, write_file("before"))
    return folder


def test_a_folder_is_replaced_and_leaves_no_sibling(tmp_path, target):
    write_atomically(target, write_file("after"))
    assert contents(target) == {"file.txt": "after"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_folder_being_written_is_the_partial_folder_of_its_target(tmp_path):
    seen = {}

    def write(folder):
        seen.update(
            {name: partial_folders(tmp_path / name) for name in ("checkpoint-3", "checkpoint-*", "checkpoint-4")}
        )
        seen["written"] = [folder]
        seen["target"] = leftover_target(folder)

    write_atomically(tmp_path / "checkpoint-3", write)
    assert seen["checkpoint-3"] == seen["checkpoint-*"] == seen["written"] and seen["checkpoint-4"] == []
    assert seen["target"] == tmp_path / "checkpoint-3" and leftover_target(tmp_path / ".checkpoint-3") is None
    assert partial_folders(tmp_path / "checkpoint-3") == []


def test_a_failing_rename_into_a_new_folder_is_a_typed_error_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "new"
    failing_rename(monkeypatch, lambda src, dst: ".new.partial-" in src and dst == str(target))
    with pytest.raises(
        OutputFileError, match=f"^Cannot write {target} \\(Permission denied\\); nothing was written there. Check"
    ):
        write_atomically(target, write_file("after"))
    assert list(tmp_path.iterdir()) == []


def test_a_failing_final_rename_puts_the_previous_folder_back(tmp_path, target, monkeypatch):
    failing_rename(monkeypatch, lambda src, dst: ".out.partial-" in src and dst == str(target))
    with pytest.raises(OutputFileError, match=f"^Cannot replace {target} \\(Permission denied\\); it keeps its prev"):
        write_atomically(target, write_file("after"))
    assert contents(target) == {"file.txt": "before"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_that_cannot_be_set_aside_is_left_alone(tmp_path, target, monkeypatch):
    failing_rename(monkeypatch, lambda src, dst: src == str(target))
    with pytest.raises(OutputFileError, match="it keeps its previous contents"):
        write_atomically(target, write_file("after"))
    assert contents(target) == {"file.txt": "before"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_when_the_previous_folder_cannot_go_back_the_error_says_where_it_is(tmp_path, target, monkeypatch):
    failing_rename(monkeypatch, lambda src, dst: dst == str(target))
    with pytest.raises(OutputFileError, match="could not be put back: they are in .+; move them back to") as error:
        write_atomically(target, write_file("after"))
    (aside,) = set_aside_folders(target)
    assert str(aside) in str(error.value) and contents(aside) == {"file.txt": "before"}
    assert leftover_target(aside) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name]


def test_a_refusal_of_the_folder_set_aside_puts_it_back(tmp_path, target):
    new = tmp_path / "new"
    new.mkdir()

    def refuse(old):
        assert contents(old) == {"file.txt": "before"} and not target.exists()
        raise ValueError("not the folder that was checked")

    with pytest.raises(ValueError, match="not the folder that was checked"):
        replace_folder(new, target, check_aside=refuse)
    assert contents(target) == {"file.txt": "before"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]

"""Shared files: atomic writes keep the umask's permissions, locks that say when they are held."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.core import files


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_are_readable_by_the_group_and_others_as_the_umask_allows(
    tmp_path, umask_022
):
    written = files.write_json(tmp_path / "run.json", {"a": 1})
    assert stat.S_IMODE(written.stat().st_mode) == 0o644  # not mkstemp's 0600
    os.umask(0o027)
    again = files.atomic_write(tmp_path / "config.yaml", "a: 1\n")
    assert stat.S_IMODE(again.stat().st_mode) == 0o640
    assert files.read_json(written) == {"a": 1}


def test_follow_umask_opens_what_safetensors_writes_0600(tmp_path, umask_022):
    """`save_pretrained` (the converted model) and `save_file` (statistics) create weights
    0600; follow_umask gives every file under a directory what `open` would have."""
    from tests.conftest import tiny_model

    tiny_model("tiny-gpt2").model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o600  # why the helper exists
    files.follow_umask(tmp_path / "model")
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()}
    assert modes == {0o644}


def test_try_lock_refuses_while_another_holder_has_it_and_frees_after(tmp_path):
    lock = tmp_path / "cases-0of1.jsonl.lock"
    # flock locks belong to an open file: a second open conflicts even in this process
    held = pytest.raises(files.LockHeld, match="cases-0of1.jsonl.lock")
    with files.try_lock(lock), held, files.try_lock(lock):
        pass
    with files.try_lock(lock):  # released
        pass

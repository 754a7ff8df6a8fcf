"""Swapping a complete checkpoint directory in, and cleaning up after a kill at any point of it."""

from __future__ import annotations

import os
from pathlib import Path

from pandallm.checkpoint.atomic import recover_swaps, swap_in


def checkpoint_dir(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    (path / "meta.pt").write_text(f"step {step}")
    (path / "__0_0.distcp").write_text(f"shard of step {step}")
    return path


def test_a_complete_directory_replaces_the_previous_one(tmp_path: Path) -> None:
    checkpoint_dir(tmp_path / "last.ckpt", 2)
    swap_in(checkpoint_dir(tmp_path / ".last.ckpt.tmp-1", 4), tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt" / "meta.pt").read_text() == "step 4"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_recovery_after_a_kill_between_the_two_renames_restores_the_previous_checkpoint(tmp_path: Path) -> None:
    # The kill came after `last.ckpt` was moved aside and before the new one took its name.
    checkpoint_dir(tmp_path / f".last.ckpt.old-{os.getpid()}", 2)
    checkpoint_dir(tmp_path / ".last.ckpt.tmp-7", 4)
    recover_swaps(tmp_path)
    assert (tmp_path / "last.ckpt" / "meta.pt").read_text() == "step 2"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_recovery_after_a_kill_before_the_cleanup_keeps_the_new_checkpoint(tmp_path: Path) -> None:
    checkpoint_dir(tmp_path / "last.ckpt", 4)
    checkpoint_dir(tmp_path / ".last.ckpt.old-7", 2)
    (tmp_path / ".epoch=0-step=6.ckpt.tmp-7").write_text("half a file")
    recover_swaps(tmp_path)
    assert (tmp_path / "last.ckpt" / "meta.pt").read_text() == "step 4"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

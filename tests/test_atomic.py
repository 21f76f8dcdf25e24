"""Output directories appear whole or not at all."""

import pytest

from ecomla.atomic import atomic_output_dir


def test_failure_keeps_old_output_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "half.bin").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and (out / "old.txt").read_text() == "old"


def test_success_replaces_and_refuses_without_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").exists() and oct(out.stat().st_mode)[-3:] != "700"
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

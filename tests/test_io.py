"""Output directories appear whole or not at all; the output policy; run locks; leftover cleanup."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ecomla.io import MARKER, OutputError, atomic_output_dir, check_output, claim, foreign_files, mark, record


def test_failure_keeps_old_output_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    record(out, "convert")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "half.bin").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and (out / "old.txt").read_text() == "old"


def test_success_replaces_and_refuses_without_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").exists() and (out / MARKER).exists() and oct(out.stat().st_mode)[-3:] != "700"
    with pytest.raises(OutputError, match="--overwrite"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.fixture
def tmpfs_path(tmp_path):
    """A fresh folder on tmpfs where there is one (/dev/shm: it lists a folder newest first), else `tmp_path`."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir=shm, prefix="ecomla-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_replaced_output_and_a_restarted_run_lose_their_marker_last(tmpfs_path, monkeypatch):
    """--overwrite renames the old output aside and removes it; killed in that removal after the marker went (on
    tmpfs the marker, written last, is listed first, so it went first), the rest stayed for good: nothing marked
    it ecomla's, so no later command removed it. The marker goes last now, and a half-removed old output is
    finished by the next run."""
    import ecomla.io as io

    tmp_path = tmpfs_path
    out = tmp_path / "ckpt"
    out.mkdir()
    for i in range(40):
        (out / f"old{i}.bin").write_text("old")
    record(out, "convert")
    removed, unlink = [], os.unlink

    def recording(path, *a, **k):
        removed.append(os.path.basename(path))
        return unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", recording)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.bin").write_text("new")
    monkeypatch.undo()
    old = [n for n in removed if n.startswith("old") or n == MARKER]
    assert len(old) == 41 and old[-1] == MARKER
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # what a removal killed before its marker leaves: the next command into the same place removes it
    left = tmp_path / ".ckpt.ecomla-old-999999999"
    left.mkdir()
    (left / "old0.bin").write_text("old")
    record(left, "convert")
    assert [p for p, _ in io.dead_leftovers(tmp_path)] == [left]  # named where the disk is short of space
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "newer.bin").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and (out / "newer.bin").exists()
    io.remove_marked(out)
    assert not out.exists()
    # a training run's folder that --overwrite restarts is emptied the same way
    run = tmp_path / "run"
    run.mkdir()
    for i in range(40):
        (run / f"old{i}.bin").write_text("old")
    record(run, "distill")
    removed.clear()
    monkeypatch.setattr(os, "unlink", recording)
    io.clear_run_dir(run)
    monkeypatch.undo()
    assert len(removed) == 41 and removed[-1] == MARKER and list(run.iterdir()) == []


def test_published_files_are_readable_as_the_umask_says(tmp_path):
    """transformers writes model.safetensors through a temporary of its own, mode 0600: a distilled model's weights
    were unreadable to the server's user while the conversion's were 0644."""
    import tempfile

    umask = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "ckpt", kind="distill") as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as a writer's own temporary is
            os.close(fd)
            os.rename(name, tmp / "model.safetensors")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "x.json").write_text("{}")
    finally:
        os.umask(umask)
    for f in ("model.safetensors", "sub/x.json", MARKER):
        assert oct((tmp_path / "ckpt" / f).stat().st_mode)[-3:] == "644", f


class Stopped(Exception):
    pass


def test_a_stop_between_the_two_renames_of_a_replacement_waits_for_both(tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C) arriving right after the old output is renamed aside is held until the new one is in place,
    then delivered: `out` holds the new output, never neither, and nothing else is left."""
    out = tmp_path / "ckpt"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    real = Path.rename

    def rename(self, target):
        moved = real(self, target)
        if Path(target).name.startswith(".ckpt.ecomla-old"):  # the first of the two renames
            signal.raise_signal(signal.SIGTERM)
        return moved

    def stop(signum, frame):
        raise Stopped

    monkeypatch.setattr(Path, "rename", rename)
    sigint = signal.getsignal(signal.SIGINT)  # Python's default, or ignored where the suite runs in the background
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped):
            with atomic_output_dir(out, overwrite=True) as tmp:
                (tmp / "a.txt").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (out / "a.txt").read_text() == "new"
    assert signal.getsignal(signal.SIGINT) is sigint  # every handler given back
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # neither the old output nor a temporary nor the lock


def test_overwrite_never_replaces_a_folder_ecomla_did_not_write(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"not written by ecomla \(it holds chapter1.tex\)"):
        check_output(out, overwrite=True)
    with pytest.raises(OutputError, match="not written by ecomla"):
        check_output(out, resume=True)
    assert (out / "chapter1.tex").read_text() == "years of work"


@pytest.mark.parametrize("where, relation", [("same", "is"), ("parent", "contains"), ("inside", "sits inside")])
def test_out_must_not_touch_an_input(tmp_path, where, relation):
    model = tmp_path / "models" / "llama"
    model.mkdir(parents=True)
    out = {"same": model, "parent": tmp_path / "models", "inside": model / "mla"}[where]
    with pytest.raises(OutputError, match=f"--out {out} {relation} the source model"):
        check_output(out, {"source model": str(model)}, overwrite=True)


def test_unwritable_or_file_blocked_out(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, so nothing can be written below it"):
        check_output(tmp_path / "file" / "out")
    with pytest.raises(OutputError, match="is a file, so nothing can be written below it"):
        with claim(tmp_path / "file" / "out"):  # said before a lock file is made there (no errno)
            pass
    with pytest.raises(OutputError, match="is a file; give a directory"):
        check_output(tmp_path / "file", overwrite=True)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="not writable"):
            check_output(ro / "out")


def test_an_empty_out_under_a_read_only_folder_is_refused_saying_why(tmp_path, monkeypatch):
    """An empty writable folder the user made, under a read-only one: refused (the lock and the temporary copy go
    beside it), and the message said only that its parent was not writable, as if --out itself were unusable."""
    import ecomla.io

    (tmp_path / "ro" / "out").mkdir(parents=True)
    real = os.access
    monkeypatch.setattr(ecomla.io.os, "access", lambda p, mode: Path(p) != tmp_path / "ro" and real(p, mode))
    with pytest.raises(OutputError, match="not writable .ecomla writes its lock and the output's temporary copy beside"):
        with claim(tmp_path / "ro" / "out"):
            pass


def test_leftovers_of_a_killed_run_are_cleaned_and_a_half_replace_rolled_back(tmp_path):
    out = tmp_path / "ckpt"
    dead = 2**22 + 12345  # no such process
    (tmp_path / f".ckpt.ecomla-tmp-{dead}-abc").mkdir()
    (tmp_path / f".ckpt.ecomla-old-{dead}").mkdir()  # killed between the two renames: `out` is missing
    (tmp_path / f".ckpt.ecomla-old-{dead}" / "model.safetensors").write_text("the previous output")
    record(tmp_path / f".ckpt.ecomla-old-{dead}", "convert")
    check_output(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (out / "model.safetensors").read_text() == "the previous output"


def test_files_named_like_temporaries_are_a_users_files(tmp_path):
    """Only names that say ecomla are taken for its temporaries: a user's `.notes.old-2023.txt` in --out makes it
    a folder that is not empty (refused, kept, listed under --overwrite), and a user's `.model.tmp-keep/` or
    `.model.old-notes` beside --out is neither removed nor renamed into place."""
    user = tmp_path / "u"
    user.mkdir()
    (user / ".notes.old-2023.txt").write_text("precious")
    (user / ".draft.tmp-1").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(OutputError):
            check_output(user, overwrite=overwrite, kind="convert")
    assert sorted(p.name for p in user.iterdir()) == [".draft.tmp-1", ".notes.old-2023.txt"]

    earlier = tmp_path / "earlier"  # an ecomla output a user added such a file to
    earlier.mkdir()
    (earlier / "model.safetensors").write_text("weights")
    record(earlier, "convert")
    (earlier / ".config.old-2023.json").write_text("precious")
    assert foreign_files(earlier) == [".config.old-2023.json"]
    with pytest.raises(OutputError, match=r"\.config\.old-2023\.json"):
        check_output(earlier, overwrite=True, kind="convert")

    (tmp_path / ".model.tmp-keep").mkdir()
    (tmp_path / ".model.tmp-keep" / "a.txt").write_text("precious")
    (tmp_path / ".model.old-notes").write_text("precious")
    (tmp_path / ".model.ecomla-old-12").write_text("not a marked output folder")
    check_output(tmp_path / "model", kind="convert")
    assert not (tmp_path / "model").exists()
    assert (tmp_path / ".model.tmp-keep" / "a.txt").read_text() == (tmp_path / ".model.old-notes").read_text() == "precious"
    assert (tmp_path / ".model.ecomla-old-12").is_file()


def test_a_second_process_cannot_take_the_lock(tmp_path):
    code = ("import sys, time; from ecomla.io import claim\n"
            "with claim(sys.argv[1], what='ecomla test'):\n    print('locked', flush=True); time.sleep(30)\n")
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=f"another ecomla process \\(pid {holder.pid}, ecomla test\\) is writing"):
            with claim(out):
                pass
        for near in (tmp_path, out / "sub"):  # the folder above and a folder inside are refused too
            with pytest.raises(OutputError, match=f"pid {holder.pid}"):
                with claim(near):
                    pass
    finally:
        holder.kill()
        holder.wait()
    with claim(out):  # the OS released the dead holder's lock
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock file, no folder made for the lock


def test_an_existing_output_is_refused_with_the_options_its_command_has(tmp_path):
    """--resume is offered only to a run of a command that takes it, --overwrite only for ecomla's own output."""
    for kind, resume in (("convert", False), ("distill", True)):
        out = tmp_path / kind
        out.mkdir()
        (out / "config.json").write_text("{}")
        record(out, kind)
        with pytest.raises(OutputError) as err:
            check_output(out, kind=kind)
        assert "pass --overwrite to replace it" in str(err.value) and ("--resume" in str(err.value)) == resume
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and was not written by ecomla .*choose another --out") as err:
        check_output(user, kind="convert")
    assert "pass --overwrite" not in str(err.value)


def test_a_users_file_inside_a_checkpoint_is_theirs(tmp_path):
    """The files a checkpoint holds are named (accelerate's for align/distill, transformers' Trainer's for DPO, TRL's
    README): --overwrite lists a user's note inside `step-N/` instead of deleting it, and takes TRL's README as ecomla's."""
    from ecomla.io import ACCELERATE_CHECKPOINT, unknown_files

    run = tmp_path / "run"
    step = run / "training" / "checkpoints" / "step-000006"
    step.mkdir(parents=True)
    (step / "pytorch_model_fsdp_0").mkdir()
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "state.json",
                 "pytorch_model_fsdp.bin", "pytorch_model_fsdp_rank1.bin", "pytorch_model_fsdp_0/__0_0.distcp"):  # FSDP's
        (step / name).write_text("x")
    mark(run, "distill")
    assert foreign_files(run) == [] and unknown_files(step, ACCELERATE_CHECKPOINT) == []
    (step / "mynote.txt").write_text("mine")
    assert foreign_files(run) == ["training/checkpoints/step-000006/mynote.txt"]
    assert unknown_files(step, ACCELERATE_CHECKPOINT) == ["mynote.txt"]
    with pytest.raises(OutputError, match="mynote.txt"):
        check_output(run, overwrite=True, kind="distill")

    state = tmp_path / "a.dpo-state"
    (state / "checkpoint-2").mkdir(parents=True)
    for name in ("README.md", "args.json", "log_history.json", "checkpoint-2/model.safetensors", "checkpoint-2/rng_state.pth",
                 "checkpoint-2/trainer_state.json", "checkpoint-2/modeling_ecomla.py", "checkpoint-2/optimizer.pt"):
        (state / name).write_text("x")
    mark(state, "dpo-state")
    assert foreign_files(state) == []
    (state / "checkpoint-2" / "analysis.py").write_text("mine")
    assert foreign_files(state) == ["checkpoint-2/analysis.py"]


def test_json_lines_are_read_whatever_the_extensions_case_and_unicode_line_separators(tmp_path):
    """data.JSONL was read as one plain-text document (the model trained on the raw JSON); a row holding an unescaped
    U+2028 (json.dumps(..., ensure_ascii=False) writes one) was cut in two and refused."""
    import json

    from ecomla.io import read_rows

    rows = [{"text": "the cat sat."}, {"text": "a line\u2028separator and\u0085a next line"}]
    for name in ("data.JSONL", "data.ndjson", "data.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        assert read_rows(tmp_path / name) == rows
    (tmp_path / "data.JSON").write_text(json.dumps(rows))
    assert read_rows(tmp_path / "data.JSON") == rows


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (mounting needs root: skipped without it)."""
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_is_named_with_the_output_and_its_free_space(small_disk, monkeypatch):
    """torch.save on a full disk raised "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos
    251392 vs 251284" (a traceback: no file, no disk named), a GGUF "4096 requested and 3424 written"; the lock's own
    write failed on a disk already full with a bare "[Errno 28]", leaving an empty lock file. Each now says which
    output and how much room its disk has, and leaves nothing behind."""
    import errno

    import torch

    from ecomla.io import atomic_torch_save, atomic_write

    atomic_write(small_disk / "kept.txt", "old")
    with pytest.raises(OutputError, match=r"writing .*big\.pt failed: .* \(the disk holding it has [\d.]+ MiB free\)"):
        atomic_torch_save(torch.zeros(1 << 17), small_disk / "big.pt")  # 512 KiB on a 256 KiB disk: torch's own error
    with pytest.raises(OutputError, match=r"writing .*kept\.txt failed: .*No space left"):
        atomic_write(small_disk / "kept.txt", "x" * (1 << 19))
    assert sorted(p.name for p in small_disk.iterdir()) == ["kept.txt"] and (small_disk / "kept.txt").read_text() == "old"
    with pytest.raises(OutputError, match=r"writing .*out failed: .*No space left"):
        with atomic_output_dir(small_disk / "out") as tmp:
            (tmp / "w.bin").write_bytes(bytes(1 << 19))
    assert sorted(p.name for p in small_disk.iterdir()) == ["kept.txt"]

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)  # the lock file is made; its pid cannot be written
    with pytest.raises(OutputError, match=r"writing .*\.elsewhere\.ecomla-lock failed"):
        with claim(small_disk / "elsewhere"):
            pass
    monkeypatch.undo()
    assert sorted(p.name for p in small_disk.iterdir()) == ["kept.txt"]

    def broken(obj, f):
        raise RuntimeError("not a disk problem")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="not a disk problem"):  # other errors pass as they are
        atomic_torch_save({"a": 1}, small_disk / "x.pt")


def test_a_short_write_on_a_disk_with_room_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """torch's "unexpected pos" also comes from a file size limit or an I/O error: with room on the disk the message
    names the file and the room, without telling the user to free space."""
    import torch

    from ecomla.io import atomic_torch_save

    def short(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", short)
    with pytest.raises(OutputError) as err:
        atomic_torch_save({"a": 1}, tmp_path / "x.pt")
    assert f"writing {tmp_path / 'x.pt'} failed: [enforce fail" in str(err.value) and "MiB free)" in str(err.value)
    assert "free space there" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_a_ctrl_c_as_a_lock_is_taken_does_not_keep_it_for_the_process(tmp_path, monkeypatch):
    """Ctrl-C between taking the lock (flock) and holding it kept the lock file's descriptor open: the same process
    (a notebook, the Python API) was refused its own output ("another ecomla process (pid ?) is writing") until it
    exited. The interrupt is delivered once the lock is held, and releases it."""
    import ecomla.io as io

    real = io._acquire

    def interrupted(*a, **k):
        fd = real(*a, **k)
        signal.raise_signal(signal.SIGINT)
        return fd
    monkeypatch.setattr(io, "_acquire", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background run ignores SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            with claim(tmp_path / "out"):
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    with claim(tmp_path / "out"):  # the same process takes it again
        pass
    assert list(tmp_path.iterdir()) == []

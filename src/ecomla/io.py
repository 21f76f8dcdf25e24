"""Files ecomla writes: atomic outputs, the output policy, run locks, and readable load errors.

The policy (every command goes through `check_output`, before any slow work):
- `--out` must not be, contain or sit inside any input (model, teacher, reference, data,
  calibration file): a failed or finished run can never delete or overwrite what it reads.
- An existing `--out` is replaced only with `--overwrite`, and only if ecomla wrote it (it holds
  the marker file MARKER); a folder of other files is never removed.
- Outputs appear atomically: written into a hidden sibling `.NAME.tmp-*`, renamed into place when
  complete. Leftovers of a killed run (`.NAME.tmp-*`, `.NAME.old-*`) are cleaned by the next run
  into the same place; an interrupted replacement is rolled back first.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

MARKER = ".ecomla-output"  # in every output directory ecomla writes: what --overwrite may replace
LOCK = ".ecomla.lock"


class OutputError(ValueError):
    """An output path that would lose a user's file, or that cannot be written."""


def local_path(source) -> Path | None:
    """The resolved local file or directory behind a source (None for hub ids and built-in names)."""
    if source is None:
        return None
    path = Path(str(source)).expanduser()
    return path.resolve() if path.exists() else None


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "sits inside"
    if out in inp.parents:
        return "contains"
    return None


def check_output(out, inputs: dict[str, object] | None = None, overwrite: bool = False, resume: bool = False) -> Path:
    """Refuse an output that would touch an input or a user's files; return it resolved.

    inputs: {description: path or source or list of them}; hub ids and missing paths are ignored.
    resume: an existing `out` is the run being resumed (it must have been written by ecomla).
    """
    out_path = _outside_inputs(out, inputs)
    clean_leftovers(out_path)
    if out_path.exists():
        if out_path.is_file():
            raise OutputError(f"--out {out} is a file; give a directory path")
        if not (overwrite or resume):
            raise OutputError(f"--out {out} exists: choose another --out, or pass --overwrite to replace it"
                              " (--resume continues a run)")
        if not written_by_ecomla(out_path):
            names = sorted(p.name for p in out_path.iterdir())[:5]
            what = f"it holds {', '.join(names)}{', ...' if len(names) == 5 else ''}" if names else "it is empty"
            raise OutputError(f"--out {out} was not written by ecomla ({what}): --overwrite and --resume only "
                              f"touch ecomla's own outputs; choose another --out, or move it away yourself")
    _check_writable(out_path, str(out))
    return out_path


def _outside_inputs(out, inputs: dict | None) -> Path:
    if out is None or not str(out).strip():
        raise OutputError("give an output path with --out")
    out_path = Path(str(out)).expanduser().resolve()
    for name, values in (inputs or {}).items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            inp = local_path(value)
            rel = inp and _relation(out_path, inp)
            if rel:
                raise OutputError(f"--out {out} {rel} the {name} {value}: writing there could destroy it; "
                                  "choose an --out outside every input")
    return out_path


def check_output_file(out, inputs: dict | None, overwrite: bool, written_by_ecomla_file, suffix: str) -> Path:
    """`check_output` for a single-file output (e.g. a GGUF): an existing file is replaced only with
    --overwrite and only if `written_by_ecomla_file(path)` says ecomla wrote it."""
    out_path = _outside_inputs(out, inputs)
    if out_path.suffix != suffix:
        raise OutputError(f"--out {out} must be a {suffix} file path (it is one file, not a folder)")
    clean_leftovers(out_path)
    if out_path.is_dir():
        raise OutputError(f"--out {out} is a directory; give a {suffix} file path")
    if out_path.exists():
        if not overwrite:
            raise OutputError(f"--out {out} exists: choose another --out, or pass --overwrite to replace it")
        if not written_by_ecomla_file(out_path):
            raise OutputError(f"--out {out} was not written by ecomla: --overwrite only replaces ecomla's own "
                              "outputs; choose another --out, or move it away yourself")
    _check_writable(out_path.parent, str(out))
    return out_path


def written_by_ecomla(directory: Path) -> bool:
    """The marker, or (folders written before the marker existed) a run's args or a converted config."""
    if (directory / MARKER).is_file() or (directory / "training" / "args.json").is_file():
        return True
    for config in (directory / "config.json", directory / "converted" / "config.json"):  # a model, a recipe's out
        try:
            if config.is_file() and '"ecomla_version"' in config.read_text(errors="replace"):
                return True
        except OSError:
            pass
    return False


def _check_writable(path: Path, shown: str) -> None:
    """The first existing ancestor (or `path` itself) must be a writable directory."""
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"--out {shown}: {probe} is a file, so nothing can be written below it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"--out {shown}: {probe} is not writable; choose another --out")


def clean_leftovers(out: Path) -> None:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings that a killed run left; roll back a half-done replace."""
    parent = out.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{out.name}.old-*"))
    if olds and not out.exists():  # killed between the two renames of a replacement: put the old one back
        olds[-1].rename(out)
        olds = olds[:-1]
    for p in [*parent.glob(f".{out.name}.tmp-*"), *olds]:
        if _owner_alive(p):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _owner_alive(p: Path) -> bool:
    m = re.search(r"\.(?:tmp|old)-(\d+)", p.name)
    if not m or int(m.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def mark(directory: Path) -> None:
    (Path(directory) / MARKER).write_text("written by ecomla; `--overwrite` may replace this folder\n")


def clear_run_dir(directory: Path) -> None:
    """Empty a run folder that --overwrite restarts, keeping only the lock its run holds."""
    for p in Path(directory).iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


@contextmanager
def atomic_output_dir(out, overwrite: bool = False, inputs: dict | None = None, log=None):
    """Yield a temporary directory beside `out`; on success it replaces `out`, on error it is removed.
    A reader never sees a half-written `out`, and a failed run leaves the old one in place."""
    out = check_output(out, inputs, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the published directory gets normal permissions
    try:
        yield tmp
        mark(tmp)
        if out.exists():
            if log:
                log(f"replacing {out} (an earlier ecomla output, --overwrite)")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_via_temporary(path, write) -> None:
    """`write(tmp)` into a temporary sibling, then rename it onto `path`: never half-written, and on error
    the temporary is removed and `path` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path, data: str | bytes) -> None:
    write_via_temporary(path, lambda tmp: tmp.write_bytes(data.encode() if isinstance(data, str) else data))


def atomic_torch_save(obj, path) -> None:
    import torch

    write_via_temporary(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(model, tokenizer, out, overwrite: bool = False, inputs: dict | None = None, log=None) -> Path:
    """`save_pretrained` of a model (and its tokenizer, if any) into `out`, atomically."""
    with atomic_output_dir(out, overwrite, inputs, log) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def read_rows(path, what: str = "data file") -> list:
    """Plain strings (a text file is one document) or the rows of a .json list / .jsonl file; errors name
    the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path}: cannot read it as UTF-8 text ({err})") from err
    if not raw.strip():
        raise ValueError(f"{what} {path} is empty")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{what} {path}, line {n}: not JSON ({err.msg} at column {err.colno})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} {path}: not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{what} {path}: expected a JSON list of rows")
        return data
    return [raw]


class RunLockedError(OutputError):
    pass


@contextmanager
def run_lock(directory):
    """Hold an exclusive lock on a run directory (released by the OS if the process dies)."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise RunLockedError(f"another ecomla run (pid {holder}) is writing {directory}: wait for it to end, "
                                 "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)

"""Write output directories atomically: into a temporary sibling, renamed into place when done."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing `out` (unless overwrite) before any slow work starts."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} exists: choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} is a file, not a directory")


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success it replaces `out`, on error it is removed.
    A reader never sees a half-written `out`, and a failed run leaves the old one in place."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the published directory gets normal permissions
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(model, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """`save_pretrained` of a model (and its tokenizer, if any) into `out`, atomically."""
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)

"""Files ecomla writes: the output policy, one lock per output, atomic outputs, readable load errors.

The policy (every command that writes goes through `claim` and `check_output`, before any slow work):
- `--out` must not be, contain or sit inside any input (model, teacher, reference, data,
  calibration file): a failed or finished run can never delete or overwrite what it reads.
- One writer per output: `claim(out)` holds an exclusive lock (a hidden sibling `.NAME.ecomla-lock`,
  released by the OS if the process dies) from the first check to the final rename. A second
  writer into the same output, or into a folder above or below one being written, is refused and
  told who holds it; two creators of one new output cannot both succeed.
- An output knows what it is: its marker file MARKER records its kind (the command that wrote it,
  options.OUTPUT_KINDS) and the files ecomla wrote there (size and, for files up to HASH_LIMIT,
  sha256). `--overwrite` replaces only an output of the same kind (another kind needs
  `--overwrite-kind KIND`, as the refusal says) whose files are all ecomla's and unchanged: any
  other file is listed and nothing is touched. `--resume` continues only a run of its own kind.
  An empty folder holds nothing to lose and is used as if absent.
- Outputs appear atomically: written into a hidden sibling `.NAME.ecomla-tmp-PID-*`, renamed into place
  when complete. Leftovers of a killed run (`.NAME.ecomla-tmp-PID*`, `.NAME.ecomla-old-PID`, their process
  gone) are cleaned by the next run into the same place; an interrupted replacement is rolled back first.
  Only names that say `ecomla` are taken for ecomla's temporaries: any other file is a user's.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# What each kind of output folder holds (a folder's marker records its kind: the policy below)
OUTPUT_KINDS = {
    "convert": "a converted model (ecomla convert)",
    "export": "an exported DeepSeek-V3 checkpoint (ecomla export)",
    "eval": "evaluation results (ecomla eval)",
    "align": "an alignment run (ecomla align: a trained model, its checkpoints and log)",
    "distill": "a distillation run (ecomla distill: a trained model, its checkpoints and log)",
    "dpo": "a DPO-trained model (ecomla dpo)",
    "dpo-state": "a DPO run's trainer state (ecomla dpo: its checkpoints)",
    "run": "a recipe run (ecomla run: every step's output and the report)",
    "report": "a recipe run's report (ecomla run)",
}

MARKER = ".ecomla-output"  # in every output folder ecomla writes: its kind and the files ecomla wrote there
LOCK_SUFFIX = ".ecomla-lock"  # `.NAME.ecomla-lock` beside output NAME while a process writes it
LEGACY_LOCK = ".ecomla.lock"  # inside run folders of ecomla <= 0.x: still honoured when held
HASH_LIMIT = 64 << 20  # files up to this size are fingerprinted by sha256, larger ones (weights) by size
# The files of one checkpoint, by name: a user's file inside one is theirs, never taken for the library's.
# accelerate's save_state (ecomla adds state.json; FSDP writes sharded folders):
ACCELERATE_CHECKPOINT = (r"(model|pytorch_model|optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.(safetensors|bin)"
                         r"|(pytorch_model_fsdp|optimizer)(_\d+)?(_rank\d+)?\.bin"  # FSDP's full and local state dicts
                         r"|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|scaler\.pt|state\.json"
                         r"|(pytorch_model_fsdp|optimizer)_\d+/[^/]+")
# transformers' Trainer (TRL's DPO): the model as save_pretrained writes it (ecomla's code files included), trainer state
TRAINER_CHECKPOINT = (r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|(config|generation_config|tokenizer"
                      r"|tokenizer_config|special_tokens_map|added_tokens|vocab|trainer_state)\.json|merges\.txt"
                      r"|chat_template\.jinja|tokenizer\.model|training_args\.bin|(optimizer|scheduler|scaler)\.pt"
                      r"|rng_state(_\d+)?\.pth|(configuration_ecomla|modeling_ecomla|mla_attention|rope)\.py")
# Files a kind of output writes as it goes, not recorded one by one (paths relative to the output).
GROWING = {
    "align": rf"training/(args\.json|log\.jsonl|sampled\.jsonl|sampling\.json|summary\.json|checkpoints/step-\d+/({ACCELERATE_CHECKPOINT}))",
    "distill": rf"training/(args\.json|log\.jsonl|sampled\.jsonl|sampling\.json|summary\.json|checkpoints/step-\d+/({ACCELERATE_CHECKPOINT}))",
    # TRL's README too; ecomla_spent.json: DPO's tokens and seconds so far (training/dpo.SPENT)
    "dpo-state": rf"args\.json|log_history\.json|README\.md|ecomla_spent\.json|checkpoint-\d+/({TRAINER_CHECKPOINT}|ecomla_spent\.json)",
    "run": r"steps\.json",
    "report": r"report\.(md|json|png)|recipe\.yaml",
}
# The outputs an output holds as parts of itself, by folder name and kind: a recipe's steps (pipeline.plan), the
# report's evaluation. Any other ecomla output inside one is another command's: --overwrite never takes it along.
NESTED_OUTPUTS = {"run": {"converted": "convert", "aligned": "align", "distilled": "distill", "dpo": "dpo",
                          "dpo.dpo-state": "dpo-state", "report": "report"},
                  "report": {"eval": "eval"}}
# Names ecomla gives its temporaries: `.NAME.ecomla-tmp-PID[-RANDOM]` (a file or folder being written),
# `.NAME.ecomla-old-PID` (the output being replaced), `.NAME.ecomla-tmp` (one every process of a run agrees on).
TMP, OLD = "ecomla-tmp", "ecomla-old"
OWNED = re.compile(rf"\.(?P<name>.+)\.(?P<kind>{TMP}|{OLD})-(?P<pid>\d+)(-[A-Za-z0-9_]+)?")  # one with its writer's pid
# Those and the locks, cleaned or ignored; no other name is taken for ecomla's (a user's `.notes.old-2023` is theirs)
OWN_TEMPORARY = re.compile(rf"{OWNED.pattern}|\..+\.{TMP}|\..+" + re.escape(LOCK_SUFFIX) + "|" + re.escape(LEGACY_LOCK))
COMMAND_OF_KIND = {"dpo-state": "dpo", "report": "run"}
RESUMABLE = ("align", "distill", "dpo", "dpo-state", "run")  # kinds whose command takes --resume


class OutputError(ValueError):
    """An output path that would lose a user's file, or that cannot be written."""


class RunLockedError(OutputError):
    """Another process is writing this output."""


def local_path(source) -> Path | None:
    """The resolved local file or directory behind a source (None for hub ids and built-in names)."""
    if source is None:
        return None
    path = Path(str(source)).expanduser()
    return path.resolve() if path.exists() else None


def relation(out: Path, inp: Path) -> str | None:
    """How path `out` lies against `inp`: 'is', 'sits inside', 'contains', or None."""
    if out == inp:
        return "is"
    if inp in out.parents:
        return "sits inside"
    if out in inp.parents:
        return "contains"
    return None


# ----------------------------------------------------------------------------- what an output is


@dataclass
class Marker:
    kind: str | None  # None: written by an ecomla that recorded neither kind nor files
    files: dict  # {relative path: [size, sha256 or None]}


def read_marker(directory) -> Marker | None:
    """The marker of an output folder; None when ecomla did not write it."""
    path = Path(directory) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError):  # the plain-text marker of earlier versions
        return Marker(None, {})
    if not isinstance(data, dict) or data.get("kind") not in OUTPUT_KINDS or not isinstance(data.get("files", {}), dict):
        return Marker(None, {})
    return Marker(data["kind"], dict(data.get("files") or {}))


def _fingerprint(path: Path) -> list:
    size = path.stat().st_size
    if size > HASH_LIMIT:
        return [size, None]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return [size, h.hexdigest()]


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def record(directory, kind: str, files=None, read_from=None) -> None:
    """Mark `directory` as an output of `kind` and add `files` to the files ecomla wrote there.

    files: paths under `directory` (default: every file now under it, for a fresh temporary folder);
    read_from: a folder holding those files now (fingerprinted there, recorded under `directory`),
    so the record is written before the files move in and a kill in between leaves no unlisted file."""
    from .version import __version__

    directory = Path(directory)
    source = Path(read_from) if read_from is not None else directory
    old = read_marker(directory)
    listed = dict(old.files) if old is not None and old.kind == kind else {}
    for p in _files_under(source) if files is None else [Path(f) for f in files]:
        p = p if p.is_absolute() else source / p
        listed[str(p.relative_to(source))] = _fingerprint(p)
    listed = {k: v for k, v in listed.items() if (directory / k).exists() or (source / k).exists()}
    atomic_write(directory / MARKER, json.dumps({"kind": kind, "ecomla_version": __version__, "files": listed}, indent=0))


def fingerprint_sources(sources) -> dict:
    """{source: fingerprint} of what a step reads. A local file or folder: each file's size and sha256 (over
    HASH_LIMIT: size and modification time, so rewritten weights count as changed); a hub id or built-in name: itself."""
    found = {}
    for source in sources:
        path = local_path(source)
        if path is None:
            found[str(source)] = None
            continue
        files = [path] if path.is_file() else [p for p in _files_under(path) if not OWN_TEMPORARY.fullmatch(p.name)]
        found[str(path)] = {str(p.relative_to(path)) if p != path else "": (
            _fingerprint(p) if p.stat().st_size <= HASH_LIMIT else [p.stat().st_size, p.stat().st_mtime_ns]) for p in files}
    return found


def check_unchanged_sources(then: dict | None, sources, run: str, what: str, why: str) -> None:
    """Refuse to resume `run` when the fingerprints of `sources` differ from `then`, the run's record of
    fingerprint_sources (none recorded: nothing to compare); `why`: what the rest of the run would get wrong."""
    if then is None:
        return
    now = fingerprint_sources(sources)
    changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
    if changed:
        raise ValueError(f"--resume of {run} with {what} that changed since it started ({', '.join(changed)}): {why}; "
                         "restore the data, or start a new run with another --out (or --overwrite)")


def mark(directory, kind: str) -> None:
    """Mark `directory` as an output of `kind` (keeping the files already recorded for that kind)."""
    record(directory, kind, files=[])


def foreign_files(directory) -> list[str]:
    """Files under an ecomla output that ecomla did not write, or that changed since it wrote them."""
    directory = Path(directory)
    marker = read_marker(directory)
    if marker is None or marker.kind is None:
        return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    grows = re.compile(GROWING.get(marker.kind, r"(?!)"))
    found = []
    for top, dirs, names in os.walk(directory):
        top = Path(top)
        for d in list(dirs):
            sub = top / d
            if OWN_TEMPORARY.fullmatch(d):
                dirs.remove(d)
            elif (sub / MARKER).is_file() and not sub.is_symlink():  # a nested output
                dirs.remove(d)
                inner, rel = read_marker(sub), sub.relative_to(directory)
                if top == directory and inner is not None and NESTED_OUTPUTS.get(marker.kind, {}).get(d) == inner.kind:
                    found += [f"{rel}/{f}" for f in foreign_files(sub)]  # a part of this output (a recipe's step)
                else:
                    found.append(f"{rel}/ ({describe(sub, inner) if inner else 'an ecomla output'}, of its own)")
            elif sub.is_symlink():
                found.append(str(sub.relative_to(directory)))
        for name in names:
            path = top / name
            rel = str(path.relative_to(directory))
            if name == MARKER and top == directory or OWN_TEMPORARY.fullmatch(name):
                continue
            if path.is_symlink():
                found.append(rel)
            elif rel in marker.files:
                size, digest = marker.files[rel]
                if path.stat().st_size != size or (digest is not None and _fingerprint(path)[1] != digest):
                    found.append(f"{rel} (changed since ecomla wrote it)")
            elif not grows.fullmatch(rel):
                found.append(rel)
    return sorted(found)


def unknown_files(folder, known: str) -> list[str]:
    """Files under `folder` (relative paths) that the regex `known` does not name: a user's, in a folder of ecomla's."""
    folder = Path(folder)
    return sorted(rel for rel in (str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
                  if not re.fullmatch(known, rel))


def step_folders(checkpoints) -> list[Path]:
    """A training run's checkpoint folders (step-N), oldest first: by step number, not by name (as text,
    step-1000000 sorts before step-999998, and the rotation deleted each new checkpoint)."""
    found = [p for p in Path(checkpoints).glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def describe(directory, marker: Marker) -> str:
    """What a user would lose with this output, in words."""
    directory = Path(directory)
    what = OUTPUT_KINDS.get(marker.kind, "an ecomla output")
    if marker.kind in ("align", "distill"):
        steps = step_folders(directory / "training" / "checkpoints")
        parts = ["a finished model" if (directory / "config.json").is_file() else "no finished model yet"]
        if steps:
            parts.append(f"{len(steps)} checkpoint(s), the last at step {int(steps[-1].name.split('-')[-1])}")
        return f"{what}: {', '.join(parts)}"
    if marker.kind == "run":
        held = [p.name for p in sorted(directory.iterdir()) if p.is_dir() and (p / MARKER).is_file()]
        return f"{what}: {', '.join(held) or 'no step finished yet'}"
    return what


# ----------------------------------------------------------------------------- the checks


def _nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(p for p in path.iterdir() if not OWN_TEMPORARY.fullmatch(p.name))


def check_output(out, inputs: dict[str, object] | None = None, overwrite: bool = False, resume: bool = False,
                 kind: str | None = None, overwrite_kind: str | None = None, clean: bool = True,
                 flag: str = "--out") -> Path:
    """Refuse an output that would touch an input or a user's files; return it resolved.

    inputs: {description: path or source or list of them}; hub ids and missing paths are ignored.
    kind: what this command writes (options.OUTPUT_KINDS); an existing `out` must be an ecomla output of
    that kind (or of `overwrite_kind`, with overwrite) holding only ecomla's unchanged files.
    resume: an existing `out` is the run being resumed (of the same kind); clean: remove a killed run's leftovers;
    flag: what the user wrote `out` as (`ecomla run`: its recipe's `out`), for the messages."""
    out_path = _outside_inputs(out, inputs, flag)
    if clean:
        clean_leftovers(out_path)
    if out_path.is_file():
        raise OutputError(f"{flag} {out} is a file; give a directory path")
    if _nonempty_dir(out_path):
        marker = read_marker(out_path)
        if not (overwrite or resume) and marker is not None:
            raise OutputError(f"--out {out} exists: choose another --out, or pass --overwrite to replace it"
                              + (" (--resume continues it)" if kind in RESUMABLE and marker.kind == kind else ""))
        if marker is None:
            names = sorted(p.name for p in out_path.iterdir())[:5]
            raise OutputError(f"{flag} {out} exists and was not written by ecomla (it holds {', '.join(names)}"
                              f"{', ...' if len(names) == 5 else ''}): ecomla never writes into a folder of yours"
                              + (" (--overwrite and --resume only touch ecomla's own outputs)" if flag == "--out" else "")
                              + f"; choose another {flag}, or move it away yourself")
        if marker.kind is None:
            raise OutputError(f"{flag} {out} was written by an earlier ecomla that recorded neither its kind nor its "
                              f"files, so ecomla cannot tell your files from its own there: choose another {flag}, or "
                              "move it away yourself")
        _check_kind(out, out_path, marker, kind, resume, overwrite_kind if overwrite else None, flag)
        if overwrite:
            foreign = foreign_files(out_path)
            if foreign:
                shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
                raise OutputError(f"--out {out} holds files ecomla did not write: {shown}. --overwrite would delete "
                                  "them: move them out of it first, or choose another --out")
    _check_writable(out_path, str(out), flag)
    return out_path


def _check_kind(out, out_path: Path, marker: Marker, kind: str | None, resume: bool, also: str | None,
                flag: str = "--out") -> None:
    if kind is None or marker.kind == kind or marker.kind == also:
        return
    command = COMMAND_OF_KIND.get(kind, kind)
    held = describe(out_path, marker)
    if resume:
        raise OutputError(f"{flag} {out} holds {held}, not a run of `ecomla {command}`: "
                          + ("--resume continues only its own kind of run" if flag == "--out" else
                             f"`ecomla {command}` continues only its own kind of run")
                          + f"; choose another {flag}")
    raise OutputError(f"--out {out} holds {held}. `ecomla {command} --overwrite` replaces only an earlier output of "
                      f"`ecomla {command}`; to replace this one and lose what it holds, add --overwrite-kind "
                      f"{marker.kind}, or choose another --out")


def _outside_inputs(out, inputs: dict | None, flag: str = "--out") -> Path:
    if out is None or not str(out).strip():
        raise OutputError(f"give an output path with {flag}")
    out_path = Path(str(out)).expanduser().resolve()
    for name, values in (inputs or {}).items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            inp = local_path(value)
            rel = inp and relation(out_path, inp)
            if rel:
                raise OutputError(f"{flag} {out} {rel} the {name} {value}: writing there could destroy it; "
                                  f"choose {'an --out' if flag == '--out' else f'another {flag}'} outside every input")
    return out_path


def check_output_file(out, inputs: dict | None, overwrite: bool, written_by_ecomla_file, suffix: str,
                      clean: bool = True) -> Path:
    """`check_output` for a single-file output (e.g. a GGUF): an existing file is replaced only with
    --overwrite and only if `written_by_ecomla_file(path)` says ecomla wrote it (clean: as check_output's)."""
    out_path = _outside_inputs(out, inputs)
    if out_path.suffix != suffix:
        raise OutputError(f"--out {out} must be a {suffix} file path (it is one file, not a folder)")
    if clean:
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


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    while not path.exists():
        path = path.parent
    return path


def _check_writable(path: Path, shown: str, flag: str = "--out", side: bool = False, fix: str | None = None) -> None:
    """The first existing ancestor (or `path` itself) must be a writable directory (`side`: a path written beside
    the output, a cache, not an output renamed into place). `fix`: what to do instead (default: choose another)."""
    probe = _existing(path)
    if not probe.is_dir():
        raise OutputError(f"{flag} {shown}: {probe} is a file, so nothing can be written below it")
    if not os.access(probe, os.W_OK | os.X_OK):
        beside = (" (ecomla writes its lock and the output's temporary copy beside the output, then renames it into "
                  "place: a writable empty folder under a read-only one cannot be used)"
                  if not side and Path(shown).expanduser().absolute().parent == probe else "")
        raise OutputError(f"{flag} {shown}: {probe} is not writable{beside}; {fix or f'choose another {flag}'}")


def check_writable_folder(path, flag: str, fix: str | None = None) -> None:
    """`path` (given by `flag`) is a folder, or can be made one, that this process can write into."""
    path = Path(path).expanduser().absolute()
    _check_writable(path, str(path), flag, side=True, fix=fix)


def size_text(n: int) -> str:
    """Bytes as a message says them: GiB to one decimal, MiB below 0.1 GiB (a small disk's '0.0 GiB free')."""
    return f"{n / 2**30:.1f} GiB" if n >= 0.1 * 2**30 else f"{n / 2**20:.0f} MiB"


def check_free_space(needs: dict, what: str, fix: str) -> None:
    """Refuse, before the work starts, to write `needs` ({path: bytes} a run will write there) where the disk
    holding a path (or its first existing ancestor) has less free (with 2% + 64 MiB slack): a full disk found
    at the end of an 8B model's conversion costs the whole conversion. `fix`: where else to write, or how less."""
    disks = {}  # device -> (a folder on it, bytes wanted there)
    for path, needed in needs.items():
        probe = _existing(Path(path).absolute())
        device = probe.stat().st_dev
        folder, total = disks.get(device, (probe, 0))
        disks[device] = (folder, total + needed)
    for folder, needed in disks.values():
        free = shutil.disk_usage(folder).free
        want = int(needed * 1.02) + (64 << 20)
        if free < want:
            left = dead_leftovers(folder) + (dead_leftovers(folder.parent) if folder.parent != folder else [])
            held = sum(n for _, n in left)
            raise OutputError(f"{what} needs about {size_text(want)} on the disk holding {folder}, which has "
                              f"{size_text(free)} free: free space there, or {fix}"
                              + (f". {size_text(held)} there is held by what killed ecomla runs left: "
                                 f"{', '.join(str(p) for p, _ in left[:3])}{' ...' if len(left) > 3 else ''} (remove it, "
                                 "or run again into the --out it was for, which cleans it)" if left else ""))


def dead_leftovers(folder: Path) -> list[tuple[Path, int]]:
    """(path, bytes) of ecomla's temporaries in `folder` whose process is gone (a killed run's partial output, or the
    old output a killed --overwrite had moved aside: `clean_leftovers` removes both)."""
    found = []
    olds = [p for p in Path(folder).glob(f".*.{OLD}-*") if (p / MARKER).is_file()]
    for p in [*Path(folder).glob(f".*.{TMP}-*"), *olds]:
        if OWNED.fullmatch(p.name) and not _owner_alive(p) and not p.is_symlink():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
            found.append((p, size))
    return sorted(found, key=lambda t: -t[1])


def temporary_sibling(path: Path, unique: str = "") -> Path:
    """Where `path` is written before it is renamed into place: `.NAME.ecomla-tmp-PID` (+ `unique`)."""
    return path.with_name(f".{path.name}.{TMP}-{os.getpid()}{unique}")


def clean_leftovers(out: Path) -> None:
    """Remove the `.NAME.ecomla-tmp-PID*` / `.NAME.ecomla-old-PID` siblings a killed run left (their process gone);
    roll back a half-done replace (an old output that is ecomla's, marked, where `out` is missing). Nothing named
    otherwise is touched."""
    parent = out.parent
    if not parent.is_dir():
        return
    def ours(kind):
        return sorted(p for p in parent.glob(f".{glob_escape(out.name)}.{kind}-*")
                      if (m := OWNED.fullmatch(p.name)) and m["name"] == out.name and not _owner_alive(p))

    olds = [p for p in ours(OLD) if p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()]
    if olds and not out.exists():  # killed between the two renames of a replacement: put the old one back
        olds[-1].rename(out)
        olds = olds[:-1]
    for p in ours(TMP):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    for p in olds:
        remove_marked(p, ignore_errors=True)


def remove_marked(folder: Path, ignore_errors: bool = False) -> None:
    """Remove an output folder ecomla marked, its marker last: killed half-way (a replaced output's gigabytes take a
    while), what stays is still marked ecomla's, and the next command into the same place finishes the removal."""
    try:
        _empty_marker_last(folder)
        folder.rmdir()
    except OSError:
        if not ignore_errors:
            raise


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _owner_alive(p: Path) -> bool:
    m = OWNED.fullmatch(p.name)
    if not m or int(m["pid"]) == os.getpid():
        return False
    try:
        os.kill(int(m["pid"]), 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def clear_run_dir(directory: Path) -> None:
    """Empty a run folder that --overwrite restarts (check_output has made sure every file in it is ecomla's)."""
    _empty_marker_last(Path(directory), keep=(LEGACY_LOCK,))


def _empty_marker_last(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove what a folder ecomla marked holds (but `keep`), its marker last: stopped half-way, what stays is still
    marked ecomla's, and the next command into the same place may take it."""
    for p in folder.iterdir():
        if p.name not in (MARKER, *keep):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (folder / MARKER).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- one writer per output

_HELD: dict[Path, int] = {}  # lock file -> descriptor, for the outputs this process is writing


def lock_file(out) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def locked_output(path: Path) -> Path:
    """The output a lock file guards (`lock_file`'s inverse; a legacy lock guards its own folder)."""
    return path.parent if path.name == LEGACY_LOCK else path.parent / path.name.removeprefix(".").removesuffix(LOCK_SUFFIX)


def _holder(path: Path) -> str | None:
    """'pid N, WHAT' of the process holding lock file `path`, or None when nobody holds it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 200).decode(errors="replace").strip()
        os.close(fd)
        return text or "pid ?"
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return None


def _refuse_writers_around(out: Path, flag: str = "--out") -> None:
    """Refuse while another process writes an output above `out` (a recipe run) or inside it."""
    nearby = [lock_file(a) for a in out.parents if a != a.parent]
    if out.is_dir() and not out.is_symlink():  # the whole tree of an ecomla output; of any other folder, its top
        walk = out.rglob if (out / MARKER).is_file() else out.glob  # (which check_output refuses unless it is empty)
        nearby += [*walk(f"*{LOCK_SUFFIX}"), *walk(LEGACY_LOCK)]
    for path in nearby:
        if path in _HELD or not path.exists():
            continue
        holder = _holder(path)
        if holder:
            where = locked_output(path)
            raise RunLockedError(f"another ecomla process ({holder}) is writing {where}, which "
                                 f"{'contains' if where in out.parents else 'sits inside'} {flag} {out}: wait for it to "
                                 f"end, or choose another {flag}")


def _acquire(path: Path, what: str, flag: str = "--out") -> int:
    import fcntl

    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "pid ?"
            os.close(fd)
            raise RunLockedError(f"another ecomla process ({holder}) is writing {locked_output(path)}: wait for it to end, "
                                 f"or choose another {flag}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # (else the holder removed the file as we opened it: take the new one)
            try:
                with disk_errors(path):  # a full disk: said, and no empty lock left behind
                    os.ftruncate(fd, 0)
                    os.write(fd, f"pid {os.getpid()}, {what}".encode())
            except BaseException:
                path.unlink(missing_ok=True)
                os.close(fd)
                raise
            return fd
        os.close(fd)
    raise OutputError(f"could not lock {path}: it keeps changing")


@contextmanager
def claim(out, inputs: dict | None = None, what: str | None = None, flag: str = "--out"):
    """Hold the write lock of output `out` (a folder or a file, existing or not) for the block: the only
    writer of `out`, of the folders above it and of everything inside it. Re-entrant in one process.
    `out` is first checked against `inputs` (nothing is created inside an input); folders made for the
    lock are removed again if nothing was written into them. `flag`: as in `check_output`."""
    out = _outside_inputs(out, inputs, flag)
    _check_writable(out.parent, str(out), flag)  # a file or a read-only folder above it: said before any lock is made
    path = lock_file(out)
    if path in _HELD:
        yield out
        return
    made = []
    for parent in reversed([out.parent, *out.parent.parents]):
        if not parent.exists():
            try:
                parent.mkdir()
            except FileExistsError:
                continue
            except OSError as err:
                _remove_empty(made)
                raise OutputError(f"{flag} {out}: cannot create {parent} ({err.strerror})") from None
            made.append(parent)
    try:
        with signals_deferred():  # a Ctrl-C between taking the lock and holding it here kept it for the process's life
            _refuse_writers_around(out, flag)
            _HELD[path] = _acquire(path, what or "ecomla " + " ".join(sys.argv[1:2]), flag)
    except BaseException:
        if path in _HELD:
            _release(path)
        _remove_empty(made)
        raise
    try:
        yield out
    finally:
        _release(path)
        _remove_empty(made)


def _release(path: Path) -> None:
    import fcntl

    fd = _HELD.pop(path)
    path.unlink(missing_ok=True)  # removed while still held: a process that opened it meanwhile retries
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


run_lock = claim  # the name of earlier versions


# ----------------------------------------------------------------------------- writing


@contextmanager
def claimed_output(out, inputs: dict | None = None, overwrite: bool = False, kind: str | None = None,
                   overwrite_kind: str | None = None, resume: bool = False, flag: str = "--out"):
    """`claim` `out`, then `check_output` it under the lock; yields the checked path (the pattern of every
    command that writes one output: the only writer from the first check to the final rename)."""
    with claim(out, inputs, flag=flag):
        yield check_output(out, inputs, overwrite, resume=resume, kind=kind, overwrite_kind=overwrite_kind, flag=flag)


def check_side_output(path, flag: str, out, inputs: dict | None = None, fix: str | None = None) -> None:
    """Refuse a path a command writes beside its output as it runs (a cache) inside or above `out` or an input
    (`fix`: what to do instead, when it is not "choose another `flag`")."""
    target = Path(path).expanduser().resolve()
    places = {"--out": (out, Path(out).expanduser().resolve()),
              **{name: (p, local_path(p)) for name, p in (inputs or {}).items() if isinstance(p, (str, Path))}}
    for name, (shown, place) in places.items():
        rel = place and relation(target, place)
        if rel:
            raise OutputError(f"{flag} {path} {rel} {'the ' if name != '--out' else ''}{name} {shown}: it would be "
                              f"written there; {fix or f'choose another {flag}'}")


@contextmanager
def signals_deferred():
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block ends, then deliver the first one caught, to the handler that
    was in place (in the main thread, where Python runs signal handlers; elsewhere a plain block). For a few
    renames that must not be cut in two."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if caught:
            signal.raise_signal(caught[0])


def as_umask_makes(folder: Path) -> None:
    """Give the files under `folder` the permissions the umask gives new files: some writers' own temporaries leave
    them 0600 (transformers' model.safetensors), unreadable to a server running as another user."""
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~umask)


@contextmanager
def atomic_output_dir(out, overwrite: bool = False, inputs: dict | None = None, log=None, *, kind: str = "convert",
                      overwrite_kind: str | None = None):
    """Yield a temporary directory beside `out`; on success it replaces `out`, on error it is removed.
    A reader never sees a half-written `out`, and a failed run leaves the old one in place. The whole
    block holds `out`'s lock; the checks run again just before the rename (a user may have added a file)."""
    with claimed_output(out, inputs, overwrite, kind=kind, overwrite_kind=overwrite_kind) as out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_sibling(out, "-").name, dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the published directory gets normal permissions
        replaced = None  # the old output once the new one took its place
        try:
            with disk_errors(out):
                yield tmp
            as_umask_makes(tmp)
            record(tmp, kind)
            check_output(out, inputs, overwrite, kind=kind, overwrite_kind=overwrite_kind, clean=False)
            if _nonempty_dir(out):
                if log:
                    log(f"replacing {out} (an earlier ecomla output, --overwrite)")
                old = out.with_name(f".{out.name}.{OLD}-{os.getpid()}")
                with signals_deferred():  # stopped between the renames, `out` would hold neither output
                    out.rename(old)
                    tmp.rename(out)
                    replaced = old
                remove_marked(old)
            else:
                if out.is_dir():
                    shutil.rmtree(out)  # empty but for ecomla's own temporaries
                tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if replaced is not None and replaced.exists():  # stopped as the renames ended: the swap is done
                remove_marked(replaced, ignore_errors=True)


# How a write cut short by a full disk shows itself: an OSError (errno ENOSPC/EDQUOT, or numpy's "4096 requested and
# 3424 written" without one), safetensors' "No space left on device", torch.save's RuntimeError ("unexpected pos 704 vs
# 598", "iostream error"), none of which names the file or the space
_SHORT_WRITE = re.compile(r"No space left|Disk quota|requested and \d+ written|unexpected pos|iostream error|"
                          r"PytorchStreamWriter failed|file write failed", re.IGNORECASE)


FULL_DISK_BYTES = 64 << 20  # a failed write with this little room left is taken for a full disk


@contextmanager
def disk_errors(path):
    """Say which output failed and how much room its disk has when a write under `path` runs out of space."""
    try:
        yield
    except Exception as err:
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        writer = isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"
        if not (full or writer and _SHORT_WRITE.search(str(err))):
            raise
        try:
            free = shutil.disk_usage(_existing(Path(path).absolute())).free
        except OSError:
            free = None
        full = full or free is not None and free < FULL_DISK_BYTES  # (else a file size limit, an I/O error, ...)
        raise OutputError(f"writing {path} failed: {str(err)[:200]} (the disk holding it has "
                          f"{'an unknown amount' if free is None else f'{free / 2**20:.1f} MiB'} free)"
                          + (": free space there, or write elsewhere" if full else "")
                          + "; nothing half-written was kept") from err


def write_via_temporary(path, write, check=None) -> None:
    """`write(tmp)` into a temporary sibling, then rename it onto `path`: never half-written, and on error
    the temporary is removed and `path` left as it was. `check()`, when given, runs again just before the rename
    (a file that appeared at `path` meanwhile is not replaced unless it may be)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with disk_errors(path):
            write(tmp)
        if check is not None:
            check()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path, data: str | bytes) -> None:
    write_via_temporary(path, lambda tmp: tmp.write_bytes(data.encode() if isinstance(data, str) else data))


def atomic_torch_save(obj, path) -> None:
    import torch

    write_via_temporary(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(model, tokenizer, out, overwrite: bool = False, inputs: dict | None = None, log=None, *,
                    kind: str = "convert", overwrite_kind: str | None = None) -> Path:
    """`save_pretrained` of a model (and its tokenizer, if any) into `out`, atomically, as an output of `kind`."""
    with atomic_output_dir(out, overwrite, inputs, log, kind=kind, overwrite_kind=overwrite_kind) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def read_json(path, what: str, fix: str):
    """A JSON file ecomla wrote (a run's options, log, record); a damaged one is named with `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is damaged ({str(err)[:120]}): {fix}") from None


def read_log(path, fix: str) -> list[dict]:
    """The rows of a JSON-lines log ecomla appends to. A damaged last line (a process killed mid-write) is
    dropped; a damaged line before it is an error naming the file, the line and `fix`."""
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as err:
            if k == len(lines) - 1:
                break
            raise ValueError(f"training log {path}, line {n} is damaged ({str(err)[:80]}): {fix}") from None
        rows.append(row)
    return rows


JSON_LINES = (".jsonl", ".ndjson")  # one JSON row per line (read_rows: whatever the case of the extension)
TABLES = (".csv", ".tsv", ".parquet", ".arrow", ".xlsx", ".xls", ".feather")  # formats not read (else: plain text)


def row_name(path, n: int) -> str:
    """How an error names row `n` of a file read by `iter_rows`: 'line n' of JSON lines, else 'row n'."""
    return f"{'line' if Path(path).suffix.lower() in JSON_LINES else 'row'} {n}"


def check_input_file(path, what: str = "data file") -> Path:
    """`path` as a Path, where it is a file; else FileNotFoundError naming `what` (a folder: give its files)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{what} {path}: a folder; give its files (.txt, .json or .jsonl), one by one")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    return path


def iter_rows(path, what: str = "data file"):
    """(n, row) for each row of a .json list or .jsonl (.ndjson) file, whatever the extension's case, or (1, text)
    for a plain text file (one document); n as `row_name` names it (a JSON-lines row's own line: blank lines
    count). JSON lines are read one at a time (a corpus of GBs is never held whole); errors name the file (and
    the line)."""
    path = check_input_file(path, what)
    suffix = path.suffix.lower()  # data.JSONL is JSON lines too (it was read as one plain-text document)
    if suffix in TABLES:  # read as plain text, a table trained on its header, commas and quotes
        raise ValueError(f"{what} {path}: a {suffix} table is not read: write its rows as JSON lines (.jsonl; pandas: "
                         "df.to_json(path, orient='records', lines=True), datasets: ds.to_json(path))")
    if suffix in JSON_LINES:
        yield from _json_lines(path, what)
        return
    try:
        raw = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is no text
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path}: cannot read it as UTF-8 text ({err})") from err
    if not raw.strip():
        raise ValueError(f"{what} {path} is empty")
    if suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            lines = err.msg == "Extra data" and raw.lstrip().startswith("{")  # datasets' to_json writes JSON lines
            raise ValueError(f"{what} {path}: not JSON ({err.msg} at line {err.lineno}, column {err.colno})"
                             + ("; it holds a row per line: name it .jsonl" if lines else "")) from None
        if isinstance(data, dict):
            raise ValueError(f"{what} {path}: expected a JSON list of rows, got an object (keys {', '.join(list(data)[:5])}): "
                             "give the list of rows itself (one object per row), or one row per line as .jsonl")
        if not isinstance(data, list):
            raise ValueError(f"{what} {path}: expected a JSON list of rows")
        yield from enumerate(data, 1)
        return
    yield 1, raw


def _json_lines(path: Path, what: str):
    """(line number, row) of a JSON-lines file, a line at a time; a line is decoded alone, so a byte that is not
    UTF-8 is named by its line. Lines end at \\n (or \\r\\n); a line that is not JSON but splits at \\r into rows
    that are is a file with old Mac line ends (a \\r within a row is JSON's whitespace). U+2028 and U+0085 may stand
    unescaped inside a string (str.splitlines cut there)."""
    empty, n = True, 0
    with open(path, "rb") as f:
        for raw in f:
            n += 1
            if n == 1 and raw.startswith(codecs.BOM_UTF8):  # (Windows editors write one; bytes counted after it)
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                line, at = _mac_line(raw, err.start)
                raise ValueError(f"{what} {path}, line {n + line}: cannot read it as UTF-8 text (byte "
                                 f"{raw[err.start:err.start + 1]!r} at byte {err.start - at + 1} of the line: {err.reason})") from None
            if not text.strip():
                continue
            empty = False
            try:
                yield n, json.loads(text)
                continue
            except json.JSONDecodeError as err:
                whole = ValueError(f"{what} {path}, line {n}: not JSON ({err.msg} at column {err.colno})")
            rows, bad = [], None  # a file with old Mac line ends: rows ended by \r
            for k, part in enumerate(text.split("\r")):
                if part.strip():
                    try:
                        rows.append((n + k, json.loads(part)))
                    except json.JSONDecodeError as err:
                        bad = ValueError(f"{what} {path}, line {n + k}: not JSON ({err.msg} at column {err.colno})")
                        break
            if not rows:  # its first row does not parse: one broken row, said as a whole
                raise whole from None
            yield from rows
            if bad is not None:
                raise bad from None
            n += text.count("\r")
    if empty:
        raise ValueError(f"{what} {path} is empty")


def _mac_line(raw: bytes, at: int) -> tuple[int, int]:
    """(lines before, start byte) of the line holding byte `at` of `raw`: a line of rows ended by \\r (every \\r-part
    before `at` parses as JSON) counts those parts; any other line is one line."""
    head = raw[:at].decode("utf-8").split("\r")
    if len(head) > 1 and all(_parses(part) for part in head[:-1]):
        return len(head) - 1, at - len(head[-1].encode())
    return 0, 0


def _parses(part: str) -> bool:
    try:
        json.loads(part)
        return True
    except json.JSONDecodeError:
        return not part.strip()


def read_rows(path, what: str = "data file") -> list:
    """The rows of `iter_rows` (a text file: its one text), in a list."""
    return [row for _, row in iter_rows(path, what)]

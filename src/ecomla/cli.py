"""Command line: `ecomla convert | eval | align | distill | dpo | run | generate | export | kv`.

Every subcommand is generated from its options dataclass (ecomla.options): one field, one option,
one default. Errors a user can fix print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import typing
from dataclasses import MISSING, fields

from .options import JOBS, flag_of


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of `cls`; unset arguments stay absent (argparse.SUPPRESS), so the
    dataclass default is the only default."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        m = f.metadata
        if not m.get("cli", True):
            continue
        tp = hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = argparse.SUPPRESS if m["help"] == argparse.SUPPRESS else m["help"]
        if help_text is not argparse.SUPPRESS and default not in (None, False, [], {}):
            help_text += f" (default: {default})"
        kw = dict(help=help_text, default=argparse.SUPPRESS)
        if m.get("choices"):
            kw["choices"] = m["choices"]
        args = typing.get_args(tp)
        base = next((a for a in args if a is not type(None)), tp) if args and typing.get_origin(tp) is not list else tp
        if m.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper(), nargs=m.get("nargs"), help=m["help"])
            continue
        kw["dest"] = f.name
        if base is bool:  # a flag; one whose default is None (a preset decides) has a --no- form too
            kw["action"] = argparse.BooleanOptionalAction if type(None) in typing.get_args(tp) else "store_true"
        elif typing.get_origin(base) is list and not m.get("parse"):
            kw["type"] = typing.get_args(base)[0]
            kw["action"] = "append" if m.get("append") else "extend"  # (`--data a --data b`: both, not b alone)
            if not m.get("append"):  # a list flag given with no value is a mistake (an empty shell variable), never []
                kw["nargs"] = m.get("nargs") or "+"
        else:
            kw["type"] = m.get("parse") or (base if base in (int, float) else str)
            kw["metavar"] = f.name.upper() if not m.get("choices") else None
        if m.get("required"):
            kw["required"] = True
        parser.add_argument(flag_of(f), **kw)


def kv(options, log=print) -> str:
    """`ecomla kv SOURCE` (`KVOptions`): log and return the KV table of the source's config, and for a converted
    model the engines that serve it (no weights load)."""
    from .model.cache import conversion_table, exported_mla_table, original_config
    from .model.engines import engine_table
    from .sources import SUPPORTED_MODEL_TYPES, exported_mla_layout, load_config

    exported = exported_mla_layout(options.source)  # what `ecomla export` wrote: an engine's own MLA layout
    if exported is not None:
        text = exported_mla_table(**exported)
        log(text)
        return text
    config = load_config(options.source)
    if config.model_type not in (*SUPPORTED_MODEL_TYPES, "ecomla"):
        raise ValueError(f"ecomla kv reads {', '.join(SUPPORTED_MODEL_TYPES)}, ecomla models and their DeepSeek-V3 and "
                         f"deepseek2 GGUF exports, not {config.model_type!r}")
    if config.model_type != "ecomla":
        text = conversion_table(config)
    else:
        text = conversion_table(original_config(config), config) + "\n\nengines that serve it:\n" + engine_table(config)
    log(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    p = argparse.ArgumentParser(prog="ecomla", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"ecomla {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for cls in JOBS:
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        s = sub.add_parser(cls.command, help=doc, description=doc)
        add_options(s, cls)
        s.set_defaults(options_class=cls)
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a message for the user), not a bug (a traceback for us)."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler's time limit, torchrun stopping its workers) or SIGHUP (the terminal
    closed) raised as Ctrl-C is: the `finally` blocks run, so a command's temporary output is removed and its lock
    released."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class ReaderGone:
    """stdout that drops what is written once its reader has gone (`ecomla eval ... | head -1`): the command goes on,
    writes its outputs and exits 0, where printing raised BrokenPipeError (an OSError, taken for bad input) after the
    work, before the results were written."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def _call(self, name: str, *args):
        if not self.gone:
            try:
                return getattr(self.stream, name)(*args)
            except BrokenPipeError:
                self.gone = True
                try:  # Python's own flush of stdout at exit must not fail on the pipe either
                    os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
                except (OSError, ValueError):  # (no file descriptor: a test's capture)
                    pass
        return len(args[0]) if name == "write" else None

    def write(self, text: str):
        return self._call("write", text)

    def flush(self):
        self._call("flush")

    def __getattr__(self, name):
        return getattr(self.stream, name)


def close_progress_bars() -> None:
    """Close the progress bars a stopped command left open, so its last line (the error) stands alone: it was glued
    to a bar in a log file, and the bar drawn again after it."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        bar.close()


_SLOWED = {"commands": 0, "init": None}  # tqdm's own constructor while commands (threads of one process) run
_SLOWED_LOCK = threading.Lock()


def slow_progress_bars(seconds: float = 30):
    """Progress bars redrawn at most every `seconds` (tqdm's `mininterval`) until the returned function is called.
    tqdm reads TQDM_MININTERVAL once, as it is imported, which `import ecomla` may already have done (`python -m
    ecomla.cli`, `main()` from Python: the variable was set too late); its constructor's defaults are set instead,
    and restored when the last command running in this process ends."""
    from functools import partialmethod

    import tqdm.std

    with _SLOWED_LOCK:
        if _SLOWED["commands"] == 0:
            init = _SLOWED["init"] = tqdm.std.tqdm.__dict__["__init__"]  # a partialmethod (its env-variable defaults)
            tqdm.std.tqdm.__init__ = partialmethod(getattr(init, "func", init), **{**getattr(init, "keywords", {}),
                                                                                   "mininterval": seconds})
        _SLOWED["commands"] += 1

    def restore():
        with _SLOWED_LOCK:
            _SLOWED["commands"] -= 1
            if _SLOWED["commands"] == 0:
                tqdm.std.tqdm.__init__ = _SLOWED["init"]

    return restore


_COMMAND_PID = None  # the process `main` runs in: a child forked from it (lm-eval's bootstrap pool) inherits the handler


def _terminate(signum, frame):
    if os.getpid() != _COMMAND_PID:  # a forked worker being shut down: end as the default would, without a traceback
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    global _COMMAND_PID
    args = build_parser().parse_args(argv)
    cls = args.options_class
    _COMMAND_PID = os.getpid()
    for signum in (signal.SIGTERM, signal.SIGHUP):  # their default dies at once, leaving the temporaries
        if signal.getsignal(signum) is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
            signal.signal(signum, _terminate)  # (nohup's ignored SIGHUP stays ignored)
    quiet_bars = sys.stderr is not None and not sys.stderr.isatty() and "TQDM_MININTERVAL" not in os.environ
    restore_bars = slow_progress_bars() if quiet_bars else None  # a log file (CI, nohup): not a redraw per step
    stdout = sys.stdout
    if stdout is not None:  # (None: started with stdout closed, `>&-`; print then writes nothing)
        sys.stdout = ReaderGone(stdout)
    try:
        options = cls.from_args(args)
        options.run()
        if sys.stdout is not None:  # (what is still buffered meets a gone reader here, not in Python's exit)
            sys.stdout.flush()
    except user_errors() as err:
        close_progress_bars()
        print(f"ecomla {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Terminated as stop:
        close_progress_bars()
        print(f"ecomla {args.command}: terminated ({signal.Signals(stop.signum).name}); nothing half-written is left",
              file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"ecomla {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stdout
        if restore_bars:
            restore_bars()
    return 0


if __name__ == "__main__":
    sys.exit(main())

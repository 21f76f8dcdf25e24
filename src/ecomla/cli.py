"""Command line: `ecomla convert | eval | align | distill | dpo | run | generate | export | kv`.

Every subcommand is generated from its options dataclass (ecomla.options): one field, one option,
one default. Errors a user can fix print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import MISSING, fields

from .options import (
    JOBS, AlignOptions, ConvertOptions, DistillOptions, DPOOptions, EvalOptions, ExportOptions, GenerateOptions, KVOptions, RunOptions,
    flag_of,
)


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
            kw["action"] = "append" if m.get("append") else "store"
            if not m.get("append"):
                kw["nargs"] = m.get("nargs") or "*"
        else:
            kw["type"] = m.get("parse") or (base if base in (int, float) else str)
            kw["metavar"] = f.name.upper() if not m.get("choices") else None
        if m.get("required"):
            kw["required"] = True
        parser.add_argument(flag_of(f), **kw)


def _convert(o: ConvertOptions) -> None:
    from .conversion import convert_checkpoint

    convert_checkpoint(o)


def _eval(o: EvalOptions) -> None:
    from .evaluation.evaluate import run_eval

    md, _ = run_eval(o)
    print(md)
    if o.out:
        print(f"wrote {o.out}/results.md, results.json, results.png")


def _distill(o: DistillOptions) -> None:
    from .training.distill import distill

    distill(o)


def _align(o: AlignOptions) -> None:
    from .training.align import align

    align(o)


def _dpo(o: DPOOptions) -> None:
    from .training.dpo import dpo

    print(f"saved {dpo(o)}")


def _run(o: RunOptions) -> None:
    from .pipeline import run_recipe

    report = run_recipe(o.recipe)
    print(f"report: {report}/report.md, report.json, report.png")


def _generate(o: GenerateOptions) -> None:
    from .generation import generate

    generate(o)


def _export(o: ExportOptions) -> None:
    from .export import export_checkpoint

    export_checkpoint(o)


def _kv(o: KVOptions) -> None:
    from .conversion.kv import kv_report

    print(kv_report(o.source))


COMMANDS = {ConvertOptions: _convert, EvalOptions: _eval, DistillOptions: _distill, AlignOptions: _align, DPOOptions: _dpo, RunOptions: _run,
            GenerateOptions: _generate, ExportOptions: _export, KVOptions: _kv}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecomla", description=__doc__.split("\n")[0])
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cls = args.options_class
    try:
        options = cls.from_args(args)
        COMMANDS[cls](options)
    except user_errors() as err:
        print(f"ecomla {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ecomla {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

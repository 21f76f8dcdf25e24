"""ecomla: upcycle pretrained MHA/GQA language models into Multi-head Latent Attention (X-EcoMLA).

The pipeline, one subpackage per stage: `model` (what a checkpoint holds), `conversion`,
`training` (distillation, DPO), `evaluation`, `export`, `kernels`; `options` defines every job's
options once (API, CLI and recipes), `pipeline` runs a recipe, `cli` is the command line.

`import ecomla` registers the converted model with transformers' Auto classes (so
`AutoModelForCausalLM.from_pretrained` loads a converted checkpoint). The `ecomla` command skips that
import (torch and transformers, seconds): `ecomla --help` answers at once and Ctrl-C at any time stops
it cleanly; each command imports what it uses (`sources` registers the model before any load).
"""

import os
import sys
from importlib import import_module

from .version import __version__

_NAMES = {"convert": "conversion", "convert_checkpoint": "conversion", "EcoMLAConfig": "model",
          "EcoMLAForCausalLM": "model", "EcoMLAModel": "model", "load_model": "sources",
          **{name: "options" for name in ("AlignOptions", "ConvertOptions", "DistillOptions", "DPOOptions",
                                          "EvalOptions", "ExportOptions", "GenerateOptions", "MLAConversionConfig")}}

__all__ = [*_NAMES, "__version__"]


def __getattr__(name: str):
    """The public names, imported when first used (PEP 562)."""
    if name not in _NAMES:
        raise AttributeError(f"module 'ecomla' has no attribute {name!r}")
    value = getattr(import_module(f".{_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value


def _command_line() -> bool:
    """True in the `ecomla` console script pip installed beside this Python (a user's own script named ecomla
    elsewhere still registers the model classes)."""
    script = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return (os.path.basename(script) == "ecomla"
            and os.path.dirname(os.path.abspath(script)) == os.path.dirname(os.path.abspath(sys.executable)))


if not _command_line():
    import_module(".model", __name__)  # registers EcoMLA with AutoConfig / AutoModelForCausalLM

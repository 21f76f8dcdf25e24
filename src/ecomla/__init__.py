"""ecomla: upcycle pretrained MHA/GQA language models into Multi-head Latent Attention (X-EcoMLA).

The pipeline, one subpackage per stage: `model` (what a checkpoint holds), `conversion`,
`training` (distillation, DPO), `evaluation`, `export`, `kernels`; `options` defines every job's
options once (API, CLI and recipes), `pipeline` runs a recipe, `cli` is the command line.
"""

from .conversion import convert, convert_checkpoint
from .model import EcoMLAConfig, EcoMLAForCausalLM, EcoMLAModel
from .options import AlignOptions, ConvertOptions, DistillOptions, DPOOptions, EvalOptions, ExportOptions, GenerateOptions, MLAConversionConfig
from .sources import load_model
from .version import __version__

__all__ = ["EcoMLAConfig", "EcoMLAForCausalLM", "EcoMLAModel", "AlignOptions", "ConvertOptions", "DistillOptions", "DPOOptions",
           "EvalOptions", "ExportOptions", "GenerateOptions", "MLAConversionConfig", "convert", "convert_checkpoint",
           "load_model", "__version__"]

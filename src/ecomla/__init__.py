"""ecomla: upcycle pretrained MHA/GQA language models into Multi-head Latent Attention (X-EcoMLA)."""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ecomla import EcoMLAConfig
from .modeling_ecomla import EcoMLAForCausalLM, EcoMLAModel

AutoConfig.register("ecomla", EcoMLAConfig, exist_ok=True)
AutoModel.register(EcoMLAConfig, EcoMLAModel, exist_ok=True)
AutoModelForCausalLM.register(EcoMLAConfig, EcoMLAForCausalLM, exist_ok=True)
# save_pretrained copies the self-contained modeling files and writes `auto_map`, so the
# checkpoint also loads with trust_remote_code=True where ecomla is not installed.
EcoMLAConfig.register_for_auto_class()
EcoMLAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

from .config import MLAConversionConfig  # noqa: E402
from .convert import convert  # noqa: E402
from .sources import load_model  # noqa: E402

__all__ = ["EcoMLAConfig", "EcoMLAForCausalLM", "EcoMLAModel", "MLAConversionConfig", "convert", "load_model", "__version__"]

"""The converted model: its HF config and classes, MLA attention, RoPE pair layout.

configuration_ecomla.py, modeling_ecomla.py and the files they import are copied beside every
checkpoint (trust_remote_code), so they import only torch, transformers and each other. Importing
this package registers the classes with transformers' Auto classes.
"""

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

__all__ = ["EcoMLAConfig", "EcoMLAForCausalLM", "EcoMLAModel"]

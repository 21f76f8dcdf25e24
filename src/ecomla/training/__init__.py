"""Training after conversion: data (formats, packing), losses, distillation (KD), DPO."""

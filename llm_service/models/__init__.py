"""Language models built from the TP-aware layers and loaded from HF safetensors."""

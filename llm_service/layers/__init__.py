"""TP-aware building blocks of the language models: linear, embedding, rotary, norm, attention."""

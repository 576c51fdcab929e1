"""The decoder-only transformer (Flax NNX) and its heads."""
from instructrl.model.config import ModelConfig
from instructrl.model.transformer import (LanguageModel, ScalarModel, Transformer,
                                          attention_mask, init_cache,
                                          last_token_values)

__all__ = ["ModelConfig", "LanguageModel", "ScalarModel", "Transformer",
           "attention_mask", "init_cache", "last_token_values"]

"""Tiny transformers checkpoints built in a test (shared by the HF tests).

Weights are redrawn at a larger scale than transformers' init so that every
tensor (biases and norms included) moves the logits.
"""
import numpy as np
import torch
import transformers


def make_hf(config, seed=0, cls=transformers.AutoModelForCausalLM):
  """A transformers model with weights large enough that each one counts."""
  torch.manual_seed(seed)
  model = cls.from_config(config).eval()
  gemma = config.model_type.startswith("gemma")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or ".ln_" in name:  # Gemma stores w of (1 + w).
        one = 0.0 if gemma or name.endswith(".bias") else 1.0
        p.copy_(one + 0.2 * torch.randn_like(p))
      elif gemma and "embed" in name:  # Its inputs are scaled by sqrt(d) = 5.7:
        p.copy_(0.06 * torch.randn_like(p))  # else each token repeats itself.
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def save_dirs(tmp_path_factory, makers: dict) -> dict:
  """{name: a directory holding make()'s model, saved as safetensors}."""
  dirs = {}
  for name, make in makers.items():
    d = str(tmp_path_factory.mktemp(name))
    make_hf(make()).save_pretrained(d, safe_serialization=True)
    dirs[name] = d
  return dirs


def hf_logits(path, tokens, dtype=torch.float32):
  """transformers' logits of `tokens` for the checkpoint at `path` (numpy f32)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()

"""Hugging Face interop: GPT-2 and Llama-family checkpoints <-> instructrl.

    pre = hf.load_pretrained("/path/to/hf_dir", mesh=mesh)   # config.json +
    logits, _ = pre.model()(tokens)                           # *.safetensors
    hf.save_pretrained("/out", pre.cfg, pre.params, hf_config=pre.hf_config)
    vocab = hf.load_vocabulary("/path/to/hf_dir")             # seqio vocabulary

Only local directories and safetensors are read: no pickle, no downloads, and
neither torch nor the `safetensors` package is needed (the format is parsed
here and memory-mapped, so with a mesh each device reads only its slices).
Exports load with `transformers.AutoModelForCausalLM.from_pretrained`.
TensorFlow and seqio are imported only by `load_vocabulary`.
"""
from instructrl.tools.hf.convert import (Pretrained, hf_config_from_model,
                                         hf_tensors, load_pretrained,
                                         model_config_from_hf, read_hf_config,
                                         save_pretrained)
from instructrl.tools.hf.safetensors_io import (read_checkpoint, read_safetensors,
                                                write_safetensors)


def load_vocabulary(path: str):
  """The checkpoint's tokenizer as a seqio.Vocabulary (see `hf.tokenizer`)."""
  from instructrl.tools.hf import tokenizer  # pylint: disable=g-import-not-at-top
  return tokenizer.load_vocabulary(path)


__all__ = ["Pretrained", "hf_config_from_model", "hf_tensors", "load_pretrained",
           "load_vocabulary", "model_config_from_hf", "read_checkpoint",
           "read_hf_config", "read_safetensors", "save_pretrained",
           "write_safetensors"]

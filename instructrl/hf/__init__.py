"""Hugging Face interop: GPT-2, Llama 2/3, Mistral, Qwen2/3 and Gemma 2/3
checkpoints <-> instructrl (language models and reward models; docs/hf.md).

    from instructrl import hf
    pre = hf.load_pretrained("/path/to/hf_dir", mesh=mesh)   # config.json +
    logits, _ = pre.model()(tokens)                           # *.safetensors
    hf.save_pretrained("/out", pre.cfg, pre.params, hf_config=pre.hf_config)
    vocab = hf.load_vocabulary("/path/to/hf_dir")             # its tokenizer

Its own layer, above the core and the data layer and below the stages: a HF
directory is a checkpoint format that the stages read (`init="hf:DIR"`,
`config.hf_model`) and write (`W/<stage>/hf/`), as orbax's is for the core.
Only local directories and safetensors are read: no pickle, no downloads, and
neither torch nor the `safetensors` package is needed (the format is parsed
here and memory-mapped, so with a mesh each device reads only its slices).
Exports load with `transformers.AutoModelForCausalLM.from_pretrained`.
The tokenizer (`tokenizers` or SentencePiece, with the directory's BOS, EOS
and PAD ids) is `instructrl.data.hf_vocab`; nothing here imports TensorFlow.
"""
from instructrl.data.hf_vocab import load as load_vocabulary
from instructrl.hf.architectures import FAMILIES, FamilyError, family_for
from instructrl.hf.convert import (REWARD_BIAS_KEY, Pretrained, check_pretrained,
                                   generation_config, hf_config_from_model,
                                   hf_tensors, load_pretrained, load_reward_model,
                                   model_config_from_hf, read_hf_config,
                                   save_pretrained, save_reward_model)
from instructrl.hf.safetensors_io import (read_checkpoint, read_safetensors,
                                          write_checkpoint, write_safetensors)


__all__ = ["FAMILIES", "FamilyError", "REWARD_BIAS_KEY", "Pretrained",
           "check_pretrained", "family_for", "generation_config",
           "hf_config_from_model", "hf_tensors", "load_pretrained",
           "load_reward_model", "load_vocabulary", "model_config_from_hf",
           "read_checkpoint", "read_hf_config", "read_safetensors",
           "save_pretrained", "save_reward_model", "write_checkpoint",
           "write_safetensors"]

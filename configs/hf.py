"""InstructGPT from a Hugging Face checkpoint: SFT -> RM -> PPO -> PPO-ptx.

    python -m instructrl.main --config=configs/hf.py --workdir=W \\
      --config.hf_model=/models/Llama-3.2-1B \\
      --config.sft.data=jsonl:/data/sft.jsonl \\
      --config.rm.data=jsonl:/data/prefs.jsonl \\
      --config.ppo.data=jsonl:/data/prompts.jsonl \\
      --config.ppo.ptx_data=text:/data/pretrain.txt

`hf_model` is a local directory (config.json, safetensors, tokenizer.json or
tokenizer.model; docs/hf.md lists the families). Its config.json gives the
model's shape, its tokenizer the vocabulary (`data.vocab="hf"`), its weights
the SFT's start (`sft.init="hf"`); `hf_rm_model` (default: the policy's) the
RM's and value model's shape, whose vocabulary must be the policy's. "hf"
means "the config's hf_model (hf_rm_model for the RM)" and is read when the
run starts, because `--config.hf_model=...` is applied after this file ran;
any stage's init may also name another directory, `init="hf:DIR"`. With an
`hf_rm_model` the RM does not start from the SFT export (another shape): pass
`--config.rm.init=hf` (that checkpoint; a *ForSequenceClassification
continues its training) and PPO reads the RM that trains. PPO may start from
an existing RM without training one: `--config.ppo.rm_init=hf:DIR`.

Data (jsonl.py has the formats, TRL's among them): SFT prompt/completion,
messages or text; RM prompt/chosen/rejected, chosen/rejected or ranked K-way;
PPO prompts; PPO-ptx pretraining text. The same file serves the train and
validation splits unless the path holds "{split}" (`sft_{split}.jsonl`).
Records longer than a stage's seq_len are skipped and counted
(`data.on_error="skip"`; "raise" stops at the first).

Results: every stage's W/<stage>/export (orbax) and W/<stage>/hf/, which
`transformers.AutoModelForCausalLM.from_pretrained` loads (the RM:
`AutoModelForSequenceClassification`, num_labels=1, the format of TRL's
RewardTrainer). No eval stage: evaluate.py judges answers with the miniature
world's gold judge, which real prompts do not have; `pipeline_stages` ends
after PPO-ptx (PPO's metrics hold the RM score and the KL to SFT).

Defaults: a ~1B model (Llama 3.2 1B, Qwen2.5 1.5B, Gemma 3 1B) on one
accelerator host (8 x 16+ GiB), bf16 compute on fp32 parameters, scanned
layers with matmul outputs kept; the paper's hyperparameters (Appendix C;
configs/gpt3_shapes.py for the 1.3B row) at sequence lengths of 1024-2048.
The usual overrides shrink it to seconds on a CPU (docs/hf.md):
`--config.sft.steps=2 --config.sft.batch_size=4 --config.sft.seq_len=64 ...`.
The RM's batch holds 9 completion slots per prompt (data.pipeline.K_MAX),
also for pairs: its batch of 64 prompts is 576 rows of rm.seq_len.
"""
import ml_collections as mlc

from instructrl import config_files


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"configs/hf.py takes no variant, got {arg!r}")
  c = config_files.sibling(__file__, "default.py").get_config("")
  c.hf_model = ""  # Required: --config.hf_model=DIR.
  c.hf_rm_model = ""  # "": the policy's.
  c.pipeline_stages = ("sft", "rm", "ppo", "ppo_ptx")
  c.data.update(vocab="hf", on_error="skip")
  # Only the numerics: the shape is the checkpoint's (stages/pretrained.py).
  c.model = mlc.ConfigDict(dict(
      dtype="bfloat16", param_dtype="float32", scan_layers=True,
      remat_policy="dots_with_no_batch_dims_saveable", attention_impl=None))
  # Appendix C.1: 16 epochs, residual dropout 0.2, cosine to 10%, LR 9.65e-6,
  # batch 32, the best model by validation loss; no pretraining rows.
  c.sft.update(data="", init="hf", epochs=16.0, dropout=0.2, warmup_steps=0,
               lr=9.65e-6, batch_size=32, seq_len=2048, ptx_frac=0.0,
               log_every=10, save_every=200, eval_every=100, eval_batches=16)
  # Appendix C.2: one epoch, LR 9e-6, 64 prompts per batch, from the SFT
  # model; the bias set so that the SFT data's demonstrations score 0
  # (demo_data "": sft.data). No labeler groups in a JSONL: none held out.
  c.rm.update(data="", init="sft", candidates="world", epochs=1.0, lr=9e-6,
              warmup_steps=0, batch_size=64, seq_len=1024, dropout=0.0,
              heldout_group=-1, demo_data="", demo_batches=32, log_every=10,
              save_every=100, eval_every=100, eval_batches=16)
  # Appendix C.3-C.4: batch 512, minibatch 64, one epoch, clip 0.2, beta 0.02,
  # ptx gamma 27.8 with 8x as many pretraining rows, constant LR after 10
  # warmup iterations, EMA 0.992, temperature 1; 500 iterations = 256k
  # episodes. Prompts and responses of 512 tokens each: the KV cache of 512
  # sequences of 1024 tokens is ~8.6 GB for Llama 3.2 1B.
  c.ppo.update(data="", ptx_data="", init="sft", rm_init="rm", iterations=500,
               batch_size=512, minibatch_size=64, epochs=1, lr=9.65e-6,
               value_lr=9e-6, warmup_iterations=10, clip_eps=0.2, kl_coef=0.02,
               ptx_coef=27.8, ptx_ratio=8, ptx_seq_len=1024, lam=0.95,
               ema_decay=0.992, prompt_len=512, max_new_tokens=512, log_every=1,
               save_every=10)
  return c

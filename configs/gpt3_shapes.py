"""GPT-3 shapes and the paper's hyperparameters, shared by the full-size configs.

Not an experiment itself (no `get_config`): `sft_*.py`, `rm_6b.py` and
`ppo_ptx_*.py` load this file by path (`instructrl.config_files.sibling`),
because ml_collections loads a config file by path and the `configs/` folder
is no package. Each states only what is its own (size, TPU slice, mesh,
remat) and calls one of `sft_config`, `rm_config` or `ppo_ptx_config`:

    return config_files.sibling(__file__, "gpt3_shapes.py").sft_config(
        "1p3b", arg, topology="v5p:2x2x2", mesh=dict(fsdp=8))

Every config starts from `configs/default.py` (its full key structure, so the
training code finds every key it reads) and overrides the model, the stages
with the paper's numbers (Appendix C; `shared/reference`), and adds:

  config.tpu       the TPU slice the config targets (instructrl.tools.aot compiles
                   for it): topology, chip_config_name, chips_per_host_bounds,
                   num_slices.
  config.rm_model  the reward/value model's shape. The paper uses one 6B RM
                   for every policy size (Appendix C.2), so for a 1.3B or
                   175B policy it differs from `config.model`.

Vocabulary: GPT-3's BPE has 50257 ids; the model pads it to 50304 = 393 * 128
so the embedding and the logits split evenly over the tensor axis (and fill
TPU lanes). Ids >= 50257 are never produced by the tokenizer.
"""
import ml_collections as mlc

from instructrl import config_files

VOCAB = 50304  # 50257 padded up to a multiple of 128.
CONTEXT = 2048

# GPT-3 paper, Table 2.1. 1.3B is listed with 24 heads of 128, which does not
# multiply out to the width; 16 heads of 128 is the consistent choice.
SHAPES = {
    "1p3b": dict(num_layers=24, d_model=2048, num_heads=16),
    "6b": dict(num_layers=32, d_model=4096, num_heads=32),
    "175b": dict(num_layers=96, d_model=12288, num_heads=96),
}

# Appendix C's numbers that depend on the policy's size: the SFT LR and batch
# (C.1) and the value model's LR (C.3; the value model is the 6B RM for every
# size, but its LR follows the policy). Keyed by size, not set by each stage's
# file, because every config carries every stage: `--config.stage=pipeline`
# on ppo_ptx_175b.py runs its SFT section too.
PAPER = {
    "1p3b": dict(sft_lr=9.65e-6, sft_batch_size=32, value_lr=9e-6),
    "6b": dict(sft_lr=9.65e-6, sft_batch_size=32, value_lr=9e-6),
    "175b": dict(sft_lr=5.03e-6, sft_batch_size=8, value_lr=5e-6),
}

# Placeholders for the user's files; override on the command line, e.g.
# --config.sft.init=/mnt/ckpt/gpt3-1p3b --config.data.vocab=sentencepiece:...
DATA = "/mnt/instructrl/data"
CKPT = "/mnt/instructrl/ckpt"


def _load_default():
  return config_files.sibling(__file__, "default.py")


def model(size: str) -> mlc.ConfigDict:
  """A full-size GPT-3 model config: scanned, rematerialised, bf16 on fp32."""
  m = _load_default().get_config("").model
  m.update(vocab_size=VOCAB, max_len=CONTEXT, style="gpt", tie_embeddings=True,
           head_dim=128, num_kv_heads=None, d_ff=None, dropout_rate=0.0,
           # One compiled layer body: compile time stays flat in depth.
           scan_layers=True,
           # Keep only each layer's input; recompute the rest in the backward
           # pass. The AOT figures (docs/scale.md) show where this is needed.
           remat_policy="nothing_saveable",
           dtype="bfloat16", param_dtype="float32", **SHAPES[size])
  return m


def variants(arg: str, known=("runlocal",)) -> set:
  found = set(filter(None, (arg or "").split(",")))
  unknown = found - set(known)
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; known: "
                     f"{', '.join(known)}")
  return found


def base(size: str, stage: str) -> mlc.ConfigDict:
  """default.py's structure with a GPT-3 `size` policy and the paper's stages."""
  c = _load_default().get_config("")
  c.stage = stage
  c.model = model(size)
  c.rm_model = model("6b")  # One 6B RM (and value init) for every policy.
  c.data.update(vocab=f"sentencepiece:{DATA}/tokenizer.model", on_error="skip")
  paper = PAPER[size]
  # Appendix C.1: 16 epochs, residual dropout 0.2, cosine to 10% (steps.py's
  # end_lr_frac), no warmup; the best model by validation. No pretraining
  # rows: the paper's 10% mix is for the 2-epoch PPO-init SFT only.
  c.sft.update(data=f"jsonl:{DATA}/sft.jsonl", init=f"{CKPT}/gpt3-{size}",
               ptx_frac=0.0, ptx_data=f"text:{DATA}/pretrain.txt",
               epochs=16.0, dropout=0.2, warmup_steps=0, seq_len=CONTEXT,
               lr=paper["sft_lr"], batch_size=paper["sft_batch_size"],
               log_every=10, save_every=200, eval_every=100, eval_batches=16)
  # Appendix C.2: one epoch, LR 9e-6 cosine to 10%, 64 prompts per batch,
  # all C(K,2) pairs of a prompt in one batch (K <= 9: data.world.k_max).
  c.rm.update(data=f"jsonl:{DATA}/comparisons.jsonl",
              init=f"{CKPT}/gpt3-6b-nlp-finetuned", epochs=1.0, lr=9e-6,
              warmup_steps=0, batch_size=64, seq_len=CONTEXT, dropout=0.0,
              heldout_group=-1, demo_data=f"jsonl:{DATA}/sft.jsonl",
              demo_batches=32, log_every=10, save_every=100, eval_every=100)
  # Appendix C.3-C.4: 256k episodes of batch 512 (500 iterations), minibatch
  # 64, one epoch, clip 0.2, beta 0.02, ptx gamma 27.8 with 8x as many
  # pretraining rows as episodes, constant LR after 10 warmup iterations,
  # EMA 0.992, no discount (stages/ppo.py fixes gamma=1), temperature 1
  # (RolloutConfig's default). Value model from the 6B RM (LR: PAPER). The
  # policy LR is not in our reference notes: we use the SFT LR, inside the
  # paper's sweep (2.55e-6 .. 2.55e-5). GAE lambda is not reported; 0.95
  # follows OpenAI's earlier RLHF code.
  c.ppo.update(data=f"jsonl:{DATA}/prompts.jsonl",
               ptx_data=f"text:{DATA}/pretrain.txt", iterations=256_000 // 512,
               batch_size=512, minibatch_size=64, epochs=1,
               lr=paper["sft_lr"], value_lr=paper["value_lr"],
               warmup_iterations=10, clip_eps=0.2, kl_coef=0.02, ptx_coef=27.8,
               ptx_ratio=8, ptx_seq_len=CONTEXT // 2, lam=0.95, ema_decay=0.992,
               prompt_len=CONTEXT // 2, max_new_tokens=CONTEXT // 2,
               log_every=1, save_every=10)
  return c


def target(c: mlc.ConfigDict, topology: str, mesh: dict,
           chips_per_host_bounds=(2, 2, 1), chip_config_name: str = "default",
           num_slices: int = 1) -> None:
  """Names the TPU slice and the mesh over its chips (product = chips)."""
  c.tpu = mlc.ConfigDict(dict(topology=topology, chip_config_name=chip_config_name,
                              chips_per_host_bounds=tuple(chips_per_host_bounds),
                              num_slices=num_slices))
  c.mesh = mlc.ConfigDict(dict(dict(data=1, fsdp=1, tensor=1), **mesh))


def runlocal(c: mlc.ConfigDict) -> None:
  """Shrinks `c` to run on a laptop CPU in seconds (big_vision's `runlocal`).

  Stage sizes and data come from default.py:tiny (the miniature world, byte
  vocabulary); the model keeps the full config's switches (scan, remat, bf16
  on fp32) at a tiny shape; the TPU target becomes a 4-chip v5p slice, so
  `instructrl.tools.aot` on a runlocal config compiles in seconds.
  """
  tiny = _load_default().get_config("tiny")
  for key in ("data", "pretrain", "sft", "rm", "ppo", "eval"):
    c[key] = tiny[key]
  for key in ("sft", "rm"):
    c[key].init = "none"
  c.rm.batch_size = 8  # Splits over 8 (test) or 4 (TPU target) devices.
  for m in (c.model, c.rm_model):
    # 259 = the byte vocabulary's size, stated so that no tool needs the
    # data layer (TensorFlow) to learn it.
    m.update(num_layers=2, d_model=32, num_heads=2, head_dim=None, vocab_size=259,
             max_len=tiny.model.max_len)
  target(c, "v5p:2x2x1", dict(fsdp=-1))


def sft_config(size: str, arg: str, *, topology: str, mesh: dict,
               remat: str | None = None) -> mlc.ConfigDict:
  """SFT of a GPT-3 `size` (Appendix C.1) on the TPU slice `topology`.

  `arg` names the variants (config_flags' `file.py:arg`); `remat`, where
  given, replaces the policy's nothing_saveable where memory allows.
  """
  c = base(size, stage="sft")
  if remat:
    c.model.remat_policy = remat
  return _finish(c, arg, topology, mesh)


def rm_config(arg: str, *, topology: str, mesh: dict) -> mlc.ConfigDict:
  """The 6B RM (Appendix C.2), the one RM for every policy size."""
  return _finish(base("6b", stage="rm"), arg, topology, mesh)


def ppo_ptx_config(size: str, arg: str, *, topology: str, mesh: dict,
                   remat: str | None = None) -> mlc.ConfigDict:
  """PPO-ptx of a GPT-3 `size` policy against the 6B RM (Appendix C.3-C.4).

  `remat`, where given, applies to both trained models: the policy and the
  value model (`config.rm_model`).
  """
  c = base(size, stage="ppo_ptx")
  if remat:
    for m in (c.model, c.rm_model):
      m.remat_policy = remat
  return _finish(c, arg, topology, mesh)


def _finish(c: mlc.ConfigDict, arg: str, topology: str,
            mesh: dict) -> mlc.ConfigDict:
  target(c, topology, mesh)
  if "runlocal" in variants(arg):
    runlocal(c)
  return c

"""The PyTorch side of the benchmarks, at the same shapes (CPU, 2 threads).

* `GPT`: a plain GPT-2-like model written here (pre-LN, learned positions,
  tanh-GELU, tied embeddings, fused QKV, SDPA causal attention) for the SFT
  and RM steps, trained with AdamW behind global-norm clipping like ours.
* Sampling: HF `transformers` GPT2LMHeadModel `.generate` (KV cache,
  do_sample, temperature 1, top-k off so both sides draw from the full
  softmax).
* PPO: a plain-PyTorch iteration on HF GPT-2 models, as TRL's PPOTrainer
  structures it: generate, RM score, reference and value forwards, GAE, then
  one epoch of minibatch policy and value updates (plus the PPO-ptx LM term).
  Old log-probs come from generate's own logits, as ours come from the
  sampler, so neither side pays an extra policy forward.

torch is a bench-only dependency: nothing outside bench/ imports this.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import Case, Shape


def set_threads(n: int = 2) -> None:
  torch.set_num_threads(n)


class Block(nn.Module):

  def __init__(self, d: int, heads: int):
    super().__init__()
    self.heads = heads
    self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
    self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

  def forward(self, x):
    b, t, d = x.shape
    qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
    return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
  """Token + position embeddings, blocks, final LN; `forward` gives logits
  through the tied embedding, `hidden` the last hidden states."""

  def __init__(self, s: Shape):
    super().__init__()
    self.wte = nn.Embedding(s.vocab, s.d_model)
    self.wpe = nn.Embedding(s.max_len, s.d_model)
    self.blocks = nn.ModuleList(Block(s.d_model, s.num_heads)
                                for _ in range(s.num_layers))
    self.ln_f = nn.LayerNorm(s.d_model)
    for p in self.parameters():
      if p.dim() > 1:
        nn.init.normal_(p, std=0.02)

  def hidden(self, tokens):
    pos = torch.arange(tokens.shape[1])
    x = self.wte(tokens) + self.wpe(pos)
    for blk in self.blocks:
      x = blk(x)
    return self.ln_f(x)

  def forward(self, tokens):
    return self.hidden(tokens) @ self.wte.weight.t()


class Reward(nn.Module):
  """GPT trunk + scalar head read at the last token."""

  def __init__(self, s: Shape):
    super().__init__()
    self.gpt = GPT(s)
    self.head = nn.Linear(s.d_model, 1)

  def forward(self, tokens):
    return self.head(self.gpt.hidden(tokens)[:, -1]).squeeze(-1)


def adamw(params, lr=1e-4):
  # PyTorch's own fastest CPU AdamW (fused); betas/decay as ours.
  return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                           fused=True)


def _update(loss, model, opt):
  opt.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  opt.step()


def sft_case(s: Shape, name="sft") -> Case:
  box = {}

  def setup():
    torch.manual_seed(0)
    model = GPT(s)
    tok = torch.randint(2, s.vocab, (s.sft_batch, s.seq_len + 1))
    box.update(model=model, opt=adamw(model.parameters()), x=tok[:, :-1],
               y=tok[:, 1:].reshape(-1))

  def step():
    logits = box["model"](box["x"])
    loss = F.cross_entropy(logits.reshape(-1, s.vocab), box["y"])
    _update(loss, box["model"], box["opt"])
  return Case(name, "torch", setup, step)


def rm_case(s: Shape) -> Case:
  box = {}

  def setup():
    torch.manual_seed(1)
    model = Reward(s)
    box.update(model=model, opt=adamw(model.parameters()),
               x=torch.randint(2, s.vocab, (2 * s.rm_pairs, s.seq_len)))

  def step():
    r = box["model"](box["x"]).view(s.rm_pairs, 2)
    loss = -F.logsigmoid(r[:, 0] - r[:, 1]).mean()
    _update(loss, box["model"], box["opt"])
  return Case("rm", "torch", setup, step)


def hf_config(s: Shape):
  from transformers import GPT2Config  # pylint: disable=g-import-not-at-top
  return GPT2Config(n_layer=s.num_layers, n_embd=s.d_model, n_head=s.num_heads,
                    vocab_size=s.vocab, n_positions=s.max_len, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                    bos_token_id=None, eos_token_id=None)


def hf_lm(s: Shape, seed: int):
  from transformers import GPT2LMHeadModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  return GPT2LMHeadModel(hf_config(s))


def generate(model, prompts, s: Shape):
  """HF generate: returns (sequences [B, L+N], raw logits [B, N, V])."""
  out = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                       do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       max_new_tokens=s.new_tokens,
                       use_cache=True, pad_token_id=0, output_logits=True,
                       return_dict_in_generate=True)
  return out.sequences, torch.stack(out.logits, dim=1)


def sample_case(s: Shape) -> Case:
  box = {}

  def setup():
    model = hf_lm(s, 0).eval()
    box.update(model=model, p=torch.randint(2, s.vocab, (s.prompts, s.prompt_len)))

  @torch.no_grad()
  def step():
    box["model"].generate(box["p"], attention_mask=torch.ones_like(box["p"]),
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=s.new_tokens,
                          use_cache=True, pad_token_id=0)
  return Case("sample", "torch", setup, step)



def matmul_case(n: int = 2048) -> Case:
  box = {}

  def setup():
    torch.manual_seed(0)
    box.update(a=torch.randn(n, n), b=torch.randn(n, n))

  def step():
    torch.mm(box["a"], box["b"])
  return Case("matmul", "torch", setup, step)

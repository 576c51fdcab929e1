"""A plain-PyTorch PPO-ptx iteration on HF GPT-2 models (the PyTorch side).

Structured as TRL's PPOTrainer does one iteration -- generate, score with
the RM, reference and value forwards, GAE with gamma 1, whitened advantages,
then one epoch of minibatch updates of the policy (clipped surrogate plus
the PPO-ptx LM term) and of the value model (clipped value loss), each with
its own AdamW -- but written directly, without TRL's bookkeeping. The same
shapes, minibatch size and ptx rows as `bench.ours.PPOBench`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import Case, Shape
from bench.torch_ref import _update, adamw, generate, hf_config, hf_lm

KL_COEF, CLIP, VCLIP, LAM, PTX_COEF = 0.02, 0.2, 0.2, 0.95, 27.8


class HFScalar(nn.Module):
  """GPT2Model + a scalar head at every position (reward and value models)."""

  def __init__(self, s: Shape, seed: int):
    from transformers import GPT2Model  # pylint: disable=g-import-not-at-top
    super().__init__()
    torch.manual_seed(seed)
    self.body = GPT2Model(hf_config(s))
    self.head = nn.Linear(s.d_model, 1)

  def forward(self, seq):
    return self.head(self.body(input_ids=seq).last_hidden_state).squeeze(-1)


def _gather_logp(logits, tokens):
  return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]


class TorchPPO:

  def __init__(self, s: Shape):
    self.s = s
    self.policy, self.ref = hf_lm(s, 0), hf_lm(s, 0)
    self.rm, self.value = HFScalar(s, 1), HFScalar(s, 1)
    self.popt = adamw(self.policy.parameters(), 1e-5)
    self.vopt = adamw(self.value.parameters(), 1e-5)
    self.prompts = torch.randint(2, s.vocab, (s.prompts, s.prompt_len))
    self.ptx = None
    if s.ptx_rows:
      self.ptx = torch.randint(2, s.vocab, (s.ptx_rows, s.ptx_len + 1))
    self.box = {}

  @torch.no_grad()
  def sample(self):
    seq, logits = generate(self.policy, self.prompts, self.s)
    resp = seq[:, self.s.prompt_len:]
    self.box.update(seq=seq, resp=resp, logp=_gather_logp(logits, resp))

  @torch.no_grad()
  def score(self):
    self.box["score"] = self.rm(self.box["seq"])[:, -1]

  @torch.no_grad()
  def ref_value(self):
    b, lo = self.box, self.s.prompt_len - 1
    ref_logp = _gather_logp(self.ref(b["seq"]).logits[:, lo:-1], b["resp"])
    values = self.value(b["seq"])[:, lo:-1]
    rewards = -KL_COEF * (b["logp"] - ref_logp)
    rewards[:, -1] += b["score"]
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):  # GAE, gamma = 1.
      nxt = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
      last = rewards[:, t] + nxt - values[:, t] + LAM * last
      adv[:, t] = last
    ret = adv + values
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    b.update(values=values, adv=adv, ret=ret)

  def learn(self):
    b, s, lo = self.box, self.s, self.s.prompt_len - 1
    nmb = s.prompts // s.ppo_minibatch
    perm = torch.randperm(s.prompts)
    for i in range(nmb):
      idx = perm[i * s.ppo_minibatch:(i + 1) * s.ppo_minibatch]
      logp = _gather_logp(self.policy(b["seq"][idx]).logits[:, lo:-1], b["resp"][idx])
      ratio, adv = torch.exp(logp - b["logp"][idx]), b["adv"][idx]
      loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP)).mean()
      if self.ptx is not None:
        rows = self.ptx.shape[0] // nmb
        x = self.ptx[i * rows:(i + 1) * rows]
        logits = self.policy(x[:, :-1]).logits
        loss = loss + PTX_COEF * F.cross_entropy(logits.reshape(-1, s.vocab),
                                                 x[:, 1:].reshape(-1))
      _update(loss, self.policy, self.popt)
      v, old, ret = self.value(b["seq"][idx])[:, lo:-1], b["values"][idx], b["ret"][idx]
      vclip = old + (v - old).clamp(-VCLIP, VCLIP)
      vloss = 0.5 * torch.max((v - ret) ** 2, (vclip - ret) ** 2).mean()
      _update(vloss, self.value, self.vopt)

  def iteration(self):
    self.sample()
    self.score()
    self.ref_value()
    self.learn()


def ppo_cases(s: Shape) -> list[Case]:
  """[iteration, sample, score, ref_value, learn] sharing one TorchPPO."""
  box = {}

  def setup():
    if not box:
      box["ppo"] = TorchPPO(s)

  def call(name):
    return lambda: getattr(box["ppo"], name)()
  names = ("iteration", "sample", "score", "ref_value", "learn")
  return [Case("ppo_iter" if n == "iteration" else f"ppo_{n}", "torch", setup, call(n))
          for n in names]

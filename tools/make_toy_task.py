#!/usr/bin/env python3
r"""A toy verifiable task for RL on a CPU: one-digit sums answered by a tiny random Llama with a 32-token vocabulary.

  python tools/make_toy_task.py OUT_DIR [--seed=0]
  python -m astro_jax.main --config=configs/rl_tiny.py --config.checkpoint=OUT_DIR/model \
      --config.prompts=OUT_DIR/prompts.jsonl --config.output_dir=RUN

Writes OUT_DIR/model (a HF LlamaForCausalLM checkpoint with its tokenizer files) and OUT_DIR/prompts.jsonl (the 55
problems "a + b" with a + b <= 9, answers "a+b"), and the same problems split for configs/pipeline_tiny.py:
OUT_DIR/train.jsonl (40) and OUT_DIR/test.jsonl (the 15 with a = b or a + b = 9). The tokenizer is word-level over
whitespace: <pad> <s> </s> <unk>, "+", "=", the digits, and one token per boxed answer ("\boxed{0}" ...
"\boxed{9}"); its chat template renders a problem as "<s>a + b = " (user turns only). A response is one token: the
answer token is right when it boxes a + b (the real verifier reads it). The random start model is near-uniform over
the 32 tokens, so ~1/32 of its samples are right: groups of 8 carry signal from the first step, and a reward that
rises over a few dozen steps is learning.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} = {% endif %}" \
                "{% endfor %}"


def vocabulary() -> list[str]:
  words = [*SPECIAL, "+", "=", *map(str, range(10)), *(f"\\boxed{{{d}}}" for d in range(10))]
  return words + [f"<unused{i}>" for i in range(32 - len(words))]  # 32 ids: a round vocabulary


def save_tokenizer(out_dir: Path) -> None:
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary())}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(list(SPECIAL))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(str(out_dir))


def save_model(out_dir: Path, seed: int = 0) -> None:
  import torch
  import transformers
  config = transformers.LlamaConfig(
      vocab_size=len(vocabulary()), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10_000.0,
      tie_word_embeddings=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(seed)
  transformers.LlamaForCausalLM(config).eval().save_pretrained(str(out_dir))


def problems() -> list[dict]:
  return [{"id": f"sum_{a}_{b}", "problem": f"{a} + {b}", "answer": str(a + b)}
          for a in range(10) for b in range(10) if a + b <= 9]


def held_out(problem: dict) -> bool:
  """The test split: a = b or a + b = 9 (15 of the 55 problems)."""
  a, b = (int(x) for x in problem["problem"].split(" + "))
  return a == b or a + b == 9


def make(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
  """(checkpoint directory, prompts JSONL) of the toy task under out_dir (and its train.jsonl / test.jsonl split)."""
  out = Path(out_dir)
  model_dir = out / "model"
  model_dir.mkdir(parents=True, exist_ok=True)
  save_model(model_dir, seed)
  save_tokenizer(model_dir)
  prompts = out / "prompts.jsonl"
  prompts.write_text("".join(json.dumps(p) + "\n" for p in problems()))
  for name, test in (("train.jsonl", False), ("test.jsonl", True)):
    (out / name).write_text("".join(json.dumps(p) + "\n" for p in problems() if held_out(p) == test))
  return model_dir, prompts


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if not a.startswith("--seed=")]
  seeds = [int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--seed=")]
  if len(args) != 1:
    sys.exit("usage: python tools/make_toy_task.py OUT_DIR [--seed=N]")
  model_dir, prompts_path = make(args[0], seeds[0] if seeds else 0)
  print(f"checkpoint {model_dir}\nprompts {prompts_path}")

"""`generate` stage: prompts JSONL -> completions JSONL with the jitted sampler.

Input rows have `prompt` (raw text) or `messages` (chat; rendered with the tokenizer's own chat template, else
the Llama 3 chat format). Output rows keep the input's fields and add `completions`: a list of n
`{text, token_ids, logprobs, finish_reason}`. With no input, the first `num_prompts` MATH-500 problems are
asked with the ASTRO instruction (the README's demo).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections
from tqdm import tqdm

from astro_jax.stages import common


def sampling_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 256, "n": 1,
                                    "stop": (), "seed": 0})


def defaults() -> ml_collections.ConfigDict:
  c = common.base_config("generate")
  c.checkpoint = "asset:smollm2"  # Orbax or HF checkpoint dir, or an asset
  c.tokenizer = ""                # default: the checkpoint's own tokenizer files
  c.input = ""                    # JSONL with `prompt` or `messages`; "" = MATH-500 demo prompts
  c.num_prompts = 4               # with no input: how many MATH-500 problems
  c.output = "outputs/generate.jsonl"
  c.batch_size = 16               # rows per sampler call (prompts x n)
  c.model = common.model_config()
  c.sampling = sampling_config()
  return c


def sampling_params(c: ml_collections.ConfigDict):
  from astro_jax.sampler import SamplingParams
  stop = tuple(s for s in c.stop if s)
  return SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_new_tokens=c.max_new_tokens,
                        n=c.n, stop=stop, seed=c.seed)


def read_rows(config: ml_collections.ConfigDict) -> list[dict]:
  from astro_jax import data, prompts
  if not config.input:
    problems = data.load_benchmark("math500")[:config.num_prompts]
    return [{"id": p.id, "messages": prompts.math_messages(p.problem), "answer": p.answer} for p in problems]
  rows = data.read_jsonl_rows(config.input, torn_tail_ok=False)
  for i, row in enumerate(rows, 1):
    if not isinstance(row.get("prompt"), str) and not isinstance(row.get("messages"), list):
      raise ValueError(f"{config.input}:{i}: a row needs 'prompt' (string) or 'messages' (list of "
                       f"{{role, content}})")
  return rows


def prompt_text(row: dict, tokenizer) -> str:
  return row["prompt"] if "prompt" in row else tokenizer.chat(row["messages"])


def run(config: ml_collections.ConfigDict) -> None:
  from astro_jax import data
  from astro_jax.sampler import Sampler

  rows = read_rows(config)
  sharder = common.setup_mesh(config, "sample")
  model, tokenizer = common.load_model_and_tokenizer(config, sharder)
  sampler = Sampler(model, tokenizer, sharder=sharder, max_batch=config.batch_size)
  params = sampling_params(config.sampling)
  per_call = max(1, config.batch_size // params.n)
  out_rows = []
  for start in tqdm(range(0, len(rows), per_call), desc="generate", unit="batch"):
    chunk = rows[start:start + per_call]
    results = sampler.generate([tokenizer.encode_prompt(prompt_text(r, tokenizer)) for r in chunk], params)
    for row, completions in zip(chunk, results):
      out_rows.append({**row, "completions": [
          {"text": c.text, "token_ids": list(map(int, c.token_ids)), "logprobs": [float(x) for x in c.logprobs],
           "finish_reason": c.finish_reason} for c in completions]})
  os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
  data.write_jsonl_atomic(config.output, out_rows)
  logging.info("wrote %d rows to %s", len(out_rows), config.output)
  for row in out_rows[:3]:
    print(f"--- {row.get('id', '')}\n{row['completions'][0]['text'][:400]}")
  print(f"wrote {len(out_rows)} rows to {config.output}")

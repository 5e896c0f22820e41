"""`generate` stage: prompts JSONL -> completions JSONL with the jitted sampler.

Input rows have `prompt` (raw text) or `messages` (chat; rendered with the tokenizer's own chat template, else
the Llama 3 chat format). Output rows keep the input's fields and add `completions`: a list of n
`{text, token_ids, logprobs, finish_reason}`. With no input, the first `num_prompts` MATH-500 problems are
asked with the ASTRO instruction (the README's demo). Rows with a gold `answer` are graded, and the run ends with
a summary: answers right against the gold, finish reasons, tokens per second.

A row's samples are seeded by (sampling.seed, its index in the input, sample index): the same for any batch_size
or resume point. Finished rows are appended to `<output>.partial`; a killed run resumes from it; the output is
written atomically at the end. `<output>.settings.json` records the settings that shape results: a rerun with the
same ones finds the output complete, other settings are refused unless `overwrite`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import ml_collections
from tqdm import tqdm

from astro_jax import config_keys
from astro_jax.config_keys import Key, Keys, all_of, at_least, given, satisfies
from astro_jax.errors import UserError
from astro_jax.stages import common

# Settings that change results; batch_size, mesh and model.* only change how fast they come.
_RUN_KEYS = ("checkpoint", "tokenizer", "input", "num_prompts", "sampling")
_INPUT_KEYS = ("checkpoint", "tokenizer", "input")  # recorded as resolved path + content fingerprint

KEYS: Keys = {
    **common.base_keys("generate"),
    "checkpoint": dataclasses.replace(common.CHECKPOINT, default="asset:smollm2"),
    "tokenizer": common.TOKENIZER,
    "input": Key("", "JSONL with `prompt` or `messages` per row (\"\": the MATH-500 demo prompts)"),
    "num_prompts": Key(4, "with no input: how many MATH-500 problems", at_least(1)),
    "output": Key("outputs/generate.jsonl", "output JSONL (beside it: .partial while running, .settings.json)",
                  all_of(given("an output path is required"),
                         satisfies(lambda v: not Path(v).is_dir(), "is a directory; name a .jsonl file"))),
    "overwrite": Key(False, "replace an output made with other settings"),
    "batch_size": Key(16, "rows (prompts x n) per sampler call; does not change results", at_least(1)),
    **common.MODEL_KEYS,
    **common.ENGINE_KEYS,
    **common.SAMPLING_KEYS,  # greedy by default
}
sampling_params = common.sampling_params


def defaults() -> ml_collections.ConfigDict:
  return config_keys.defaults(KEYS)


def check(config: ml_collections.ConfigDict) -> None:
  """Config values, before anything is read or written."""
  common.check_base(config, KEYS)
  common.check_sampling(config.sampling)


def read_rows(config: ml_collections.ConfigDict) -> tuple[list[dict], list[str]]:
  """Input rows and where each came from (`file:line`, for messages)."""
  from astro_jax import data, prompts
  if not config.input:
    problems = data.load_benchmark("math500")[:config.num_prompts]
    rows = [{"id": p.id, "messages": prompts.math_messages(p.problem), "answer": p.answer} for p in problems]
    return rows, [f"math500 problem {p.id}" for p in problems]
  path = common.input_file(config.input, "input")
  numbered = data.read_jsonl_lines(path, torn_tail_ok=False)
  if not numbered:
    raise UserError(f"{config.input}: no rows (the file is empty or only blank lines)")
  for lineno, row in numbered:
    if not isinstance(row.get("prompt"), str) and not isinstance(row.get("messages"), list):
      raise data.DataError(f"{config.input}:{lineno}: a row needs 'prompt' (string) or 'messages' (list of "
                           f"{{role, content}})")
    if "messages" in row and "prompt" not in row:
      try:
        prompts.check_messages(row["messages"])
      except ValueError as e:
        raise data.DataError(f"{config.input}:{lineno}: {e}") from None
  return [row for _, row in numbered], [f"{config.input}:{lineno}" for lineno, _ in numbered]


def prompt_text(row: dict, tokenizer) -> str:
  return row["prompt"] if "prompt" in row else tokenizer.chat(row["messages"])


def settings_path(config: ml_collections.ConfigDict) -> Path:
  return Path(config.output + ".settings.json")


@common.stage_run
def run(config: ml_collections.ConfigDict) -> None:
  """Generate; see the module docstring for resumption and what is refused."""
  from astro_jax import data

  check(config)
  rows, where = read_rows(config)
  ckpt, model_cfg = common.inspect_checkpoint(config)
  tokenizer = common.load_tokenizer(config, ckpt, model_cfg)
  prompt_ids = [tokenizer.encode_prompt(prompt_text(row, tokenizer)) for row in rows]
  common.check_prompt_lengths([len(x) for x in prompt_ids], config.sampling.max_new_tokens,
                              model_cfg.max_position_embeddings, lambda i: where[i])
  output, partial = Path(config.output), Path(config.output + ".partial")
  record = common.SettingsRecord(settings_path(config), common.to_settings(config, _RUN_KEYS, _INPUT_KEYS),
                                 config.overwrite)
  common.claim_output(config, "output", directory=False)
  record.check([output, partial], "output")
  if output.exists() and record.matches():
    print(f"{output} is complete (same settings); nothing to do")
    summarize(data.read_jsonl_rows(output), output)
    return

  done = {}
  if record.matches():  # a killed run of the same settings: reuse its rows
    done = {row.pop("_index"): row for row in data.read_jsonl_rows(partial, missing_ok=True)}
  todo = [i for i in range(len(rows)) if i not in done]
  sharder = common.setup_mesh(config, "sample")
  writer = common.is_writer()  # multi-host: every process samples every row, process 0 writes
  model = common.load_model(config, ckpt, sharder)
  sampler = common.make_sampler(config, model, tokenizer, sharder=sharder, max_batch=config.batch_size,
                                dtype=config.model.dtype)
  params = sampling_params(config.sampling)
  per_call = max(1, config.batch_size // params.n)
  if writer:
    output.parent.mkdir(parents=True, exist_ok=True)
  seconds, new_tokens = 0.0, 0
  bar = tqdm(total=len(rows), initial=len(done), desc="generate", unit="prompt", disable=not writer)
  for start in range(0, len(todo), per_call):
    chunk = todo[start:start + per_call]
    began = time.perf_counter()
    results = sampler.generate([prompt_ids[i] for i in chunk], params, keys=chunk)
    seconds += time.perf_counter() - began
    new_tokens += sum(len(c.token_ids) for completions in results for c in completions)
    if start == 0 and writer:
      record.record(stale=[output, partial])
    for i, completions in zip(chunk, results):
      done[i] = {**rows[i], "completions": [
          {"text": c.text, "token_ids": list(map(int, c.token_ids)), "logprobs": [float(x) for x in c.logprobs],
           "finish_reason": c.finish_reason} for c in completions]}
      if writer:
        data.append_jsonl(partial, {"_index": i, **done[i]})
    bar.update(len(chunk))
  bar.close()
  if not writer:
    return
  if not todo:
    record.record(stale=[output])
  out_rows = [done[i] for i in range(len(rows))]
  data.write_jsonl_atomic(output, out_rows)
  partial.unlink(missing_ok=True)
  logging.info("wrote %d rows to %s", len(out_rows), output)
  summarize(out_rows, output, (new_tokens, seconds))


def summarize(rows: list[dict], output: Path, speed: tuple[int, float] | None = None) -> dict:
  """Print what a user can act on: answers right against the gold (rows with `answer`), finish reasons, speed."""
  from astro_jax import verifier
  completions = [c for row in rows for c in row["completions"]]
  n_tokens = sum(len(c["token_ids"]) for c in completions)
  reasons = {r: sum(c["finish_reason"] == r for c in completions) for r in ("eos", "stop", "length")}
  summary = {"rows": len(rows), "completions": len(completions), "tokens": n_tokens, "finish_reasons": reasons}
  for row in rows[:2]:
    print(f"--- {row.get('id', '')}\n{row['completions'][0]['text'][:300]}")
  graded = [(c["text"], row["answer"]) for row in rows if isinstance(row.get("answer"), str)
            for c in row["completions"]]
  lines = [f"wrote {len(rows)} rows ({len(completions)} completions, {n_tokens} tokens) to {output}"]
  if graded:
    verdicts = verifier.verify_batch([t for t, _ in graded], [g for _, g in graded], workers=1)
    right = sum(v.correct for v in verdicts)
    no_answer = sum(v.answer is None for v in verdicts)
    summary.update(graded=len(graded), correct=right, no_answer=no_answer)
    lines.append(f"answers: {right}/{len(graded)} right against the gold; {no_answer} with no final answer")
  lines.append("finish reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
  if speed and speed[1] > 0:
    summary["tokens_per_s"] = speed[0] / speed[1]
    lines.append(f"speed: {speed[0]} tokens in {speed[1]:.1f} s of sampling = {summary['tokens_per_s']:.1f} "
                 f"tokens/s (this run; includes compilation)")
  print("\n".join(lines))
  return summary

"""Sample and verify: problems in, verified responses out. The one loop behind rl's rewards and eval's and
difficulty's scores.

An `Item` is (key, prompt ids, gold). `per_call` items go into one `Sampler.sample` call (params.n samples each,
seeded by (params.seed, key, sample index): the same samples whatever the chunking); each call's responses are
verified on the long-lived `VerifierPool` in a thread while the next call decodes. The continuous engine gets
4 x per_call items a call (it refills its slots from the queue, so a call of one batch would leave them idle).
Multi-host: every process samples every item (call it on all of them, in the same order); only processes with
`verify` check answers, the others get `verdicts = None`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Iterator, NamedTuple, Sequence

from astro_jax import prompts
from astro_jax.sampler import Completion, Request, SamplingParams
from astro_jax.verifier import Verdict


class Item(NamedTuple):
  key: Any                 # a JSON value: the item's stable identity, which seeds its samples
  prompt_ids: Sequence[int]
  gold: str


@dataclasses.dataclass
class Verified:
  """One item's params.n responses and, where this process verifies, their verdicts."""
  item: Item
  completions: list[Completion]
  verdicts: list[Verdict] | None

  def records(self) -> list[dict]:
    """Each sample as eval and difficulty record it: {text, answer, correct, timed_out, n_tokens, finish_reason,
    reflections, backtracks}."""
    return [{"text": c.text, "answer": v.answer, "correct": v.correct, "timed_out": v.timed_out,
             "n_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
             "reflections": prompts.count_reflections(c.text), "backtracks": prompts.count_backtracks(c.text)}
            for c, v in zip(self.completions, self.verdicts)]


def generate_and_verify(sampler, pool, items: Sequence[Item], params: SamplingParams, *, per_call: int,
                        verify: bool = True, times: dict[str, float] | None = None) -> Iterator[Verified]:
  """Each item's responses and verdicts, in order, a sampler call's worth at a time (see the module docstring).
  `times` (if given) accumulates `time_sampling` (inside the sampler) and `time_scoring` (the verifier's busy time,
  overlapped with the next call's decode)."""
  times = {} if times is None else times

  def judge(chunk: Sequence[Item], outs: list[list[Completion]]) -> list[Verdict]:
    began = time.perf_counter()
    verdicts = pool.verify([c.text for o in outs for c in o], [it.gold for it, o in zip(chunk, outs) for _ in o])
    times["time_scoring"] = times.get("time_scoring", 0.0) + time.perf_counter() - began
    return verdicts

  def finish(chunk, outs, future) -> Iterator[Verified]:
    verdicts = iter(future.result()) if future is not None else None
    for it, completions in zip(chunk, outs):
      yield Verified(it, completions, None if verdicts is None else [next(verdicts) for _ in completions])

  if hasattr(sampler, "stream"):  # the continuous engine refills its slots only from calls larger than a batch
    per_call *= 4
  with concurrent.futures.ThreadPoolExecutor(1, "verifier") as executor:
    pending = None
    for start in range(0, len(items), per_call):
      chunk = items[start:start + per_call]
      began = time.perf_counter()
      outs = sampler.sample([Request(it.prompt_ids, params, key=it.key) for it in chunk])
      times["time_sampling"] = times.get("time_sampling", 0.0) + time.perf_counter() - began
      if pending is not None:  # the previous call's verdicts came in while this one decoded
        yield from finish(*pending)
      pending = (chunk, outs, executor.submit(judge, chunk, outs) if verify else None)
    if pending is not None:
      yield from finish(*pending)

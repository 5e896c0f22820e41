r"""The language-model side of the search: `LMPolicy` (the `mcts.Policy` over a `Sampler`), a self-evaluation voter
for `linearize.make_self_eval` and a step rewriter for `render`.

Search prompt. The policy asks for a solution as blank-line separated steps with a few-shot chat prompt: an
optional system message, then ONE worked example as an earlier chat turn (user: example problem + instruction,
assistant: the example solution, steps as paragraphs, ending "The final answer is \boxed{9}."), then the problem with
the same instruction, rendered with the tokenizer's own chat template (`Tokenizer.chat`). The example is there
because small instruct models do not write `\boxed{}` zero-shot (SmolLM2-135M-Instruct: 0 of 96 samples without
it; with it about 11% right on one/two-step word problems); ASTRO's search prompt was few-shot too. Set
`PromptConfig.example_problem = ""` for zero-shot.

State -> token ids. A node's state is the chat prompt followed by its root path's steps, each followed by the step
delimiter. The ids are the prompt's ids followed by each step's SAMPLED ids, so a child continues exactly the text
its parent's samples produced (no re-tokenisation drift). The sampler keeps the token that completed the stop
string, so a step's ids decode to `text + delimiter` -- except when that last token carried text past the delimiter
("\n\n\n", "\n\nThe", ...: the sampler cuts the text there but keeps the token). Then the step's ids up to that
token are kept and the rest of `text + delimiter` is encoded from text (`step_ids`); if even that prefix does not
decode to a prefix of `text + delimiter` (a multi-byte character split over tokens), the whole step is encoded from
text. Steps without ids (grafted rollout steps) are encoded from text. Encodings are cached per step.

Expansion: one request per node, n = k, stop = (delimiter,), max tokens = the step budget. A Step's log-prob is the
sum of the completion's MODEL log-probs (untempered, full vocabulary; the prior is then a property of the policy,
not of the sampling temperature); its answer is `verifier.extract_answer(text, fallbacks=("boxed",))` when the step
holds a closed `\boxed{}` (an answer in words is not a terminal: the prompt asks for a box); finish reasons map 1:1
("stop" at the delimiter, "eos", "length").

Rollouts: one request per node, n = M, no stop strings, to EOS or the rollout budget. The rollout is cut where the
search itself would end that branch: at the first step (split at the delimiter) that holds a boxed answer, or after
`max_steps` steps (the depth limit; then it has no answer unless that last step has one). Its answer is that step's
boxed answer (`answer_fallbacks`); the tokens are all the sampled ones (they count as sampled). So a rollout's reward
means what a terminal's reward means in the tree.

One call per entry point: all requests of a `propose` / `rollout` call go into ONE `sampler.sample` call (rows that
share a stop set share decodes there), so sampler calls per round do not depend on the number of trees. Requests are
seeded exactly as `mcts` requires: `Request(ids, SamplingParams(seed=req.seed, ...), key=req.key)`. A request whose
prefix leaves less room in the context than its budget gets the room left (a backstop: the `mcts` stage validates the
worst case up front); with no room at all it returns empty "length" steps / empty rollouts without sampling.

Self-evaluation (`LMVoter`): each prompt of `linearize.make_self_eval` as one user turn; n votes per prompt, all
prompts in one sample call, keyed by a hash of the prompt text (the same prompt gets the same votes in any order or
run); `prefetch` samples many trees' prompts in one call and later calls are served from the cache.
Rewriting (`LMRewriter`, off by default in the stage): `render.rewrite_prompt(context, step)` as one user turn,
greedy by default, stopped at the delimiter; one sample call per step (each step's context holds the rewritten steps
before it). An empty rewrite keeps the original step.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from astro_jax import verifier
from astro_jax.prompts import EXAMPLE_PROBLEM, EXAMPLE_SOLUTION, PromptConfig, search_prompt_ids  # noqa: F401
from astro_jax.sampler import Completion, Request, Sampler, SamplingParams
from astro_jax.search import render
from astro_jax.search.mcts import ExpandRequest, Rollout, RolloutRequest, Step
from astro_jax.search.tree import STEP_DELIMITER


def _digest(text: str) -> str:
  return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def boxed_answer(text: str) -> str | None:
  """The final boxed answer of `text`, or None (no closed box)."""
  return verifier.extract_answer(text, fallbacks=("boxed",))


class LMPolicy:
  """`mcts.Policy` over a `Sampler`: one `sampler.sample` call per `propose` / `rollout` call."""

  def __init__(self, sampler: Sampler, prompt: PromptConfig = PromptConfig(), *, delimiter: str = STEP_DELIMITER,
               answer_fallbacks: Sequence[str] = ("boxed",), top_k: int = 0):
    self.sampler, self.tokenizer, self.prompt = sampler, sampler.tokenizer, prompt
    self.delimiter, self.answer_fallbacks, self.top_k = delimiter, tuple(answer_fallbacks), top_k
    self.context = sampler.cfg.max_position_embeddings
    self._prompt_ids: dict[str, list[int]] = {}
    self._step_ids: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    self.repaired_steps = 0  # steps whose ids were (partly) re-encoded from text

  # -- prompts and states
  def prompt_ids(self, problem: str) -> list[int]:
    if problem not in self._prompt_ids:
      self._prompt_ids[problem] = search_prompt_ids(self.tokenizer, self.prompt, problem)
    return self._prompt_ids[problem]

  def step_ids(self, text: str, tokens: Sequence[int]) -> list[int]:
    """Ids of `text + delimiter` continuing a state: the sampled ids, repaired where the last one ran past the
    delimiter (see the module docstring)."""
    tokens = tuple(int(t) for t in tokens)
    key = (text, tokens)
    if key not in self._step_ids:
      want = text + self.delimiter
      decode = self.tokenizer.decode
      if tokens and decode(tokens) == want:
        ids = list(tokens)
      else:
        self.repaired_steps += 1
        ids = []
        if tokens:
          head = decode(tokens[:-1])
          if want.startswith(head) and "\ufffd" not in head:
            ids = list(tokens[:-1]) + (self.tokenizer.encode(want[len(head):]) if want[len(head):] else [])
        if not ids or decode(ids) != want:
          ids = self.tokenizer.encode(want)
      self._step_ids[key] = ids
    return self._step_ids[key]

  def state_ids(self, problem: str, steps: Sequence[str], step_tokens: Sequence[Sequence[int]]) -> list[int]:
    ids = list(self.prompt_ids(problem))
    for text, tokens in zip(steps, step_tokens):
      ids += self.step_ids(text, tokens)
    return ids

  def _room(self, ids: Sequence[int], budget: int) -> int:
    return max(0, min(budget, self.context - len(ids)))

  # -- the Policy protocol
  def propose(self, requests: Sequence[ExpandRequest]) -> list[list[Step]]:
    calls, out = [], []
    for r in requests:
      ids = self.state_ids(r.problem, r.steps, r.step_tokens)
      room = self._room(ids, r.max_tokens)
      out.append(None if room else [Step("", [], 0.0, "length", None) for _ in range(r.n)])
      if room:
        params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=self.top_k, max_new_tokens=room,
                                n=r.n, stop=tuple(r.stop), seed=r.seed)
        calls.append((len(out) - 1, Request(ids, params, key=r.key)))
    for i, completions in zip([i for i, _ in calls], self._sample([req for _, req in calls])):
      out[i] = [self._step(c) for c in completions]
    return out

  def _step(self, c: Completion) -> Step:
    return Step(c.text, list(c.token_ids), float(sum(c.model_logprobs)), c.finish_reason, boxed_answer(c.text))

  def rollout(self, requests: Sequence[RolloutRequest]) -> list[list[Rollout]]:
    calls, out = [], []
    for r in requests:
      ids = self.state_ids(r.problem, r.steps, r.step_tokens)
      room = self._room(ids, r.max_tokens)
      out.append(None if room else [Rollout("", [], None, False) for _ in range(r.n)])
      if room:
        params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=self.top_k, max_new_tokens=room,
                                n=r.n, seed=r.seed)
        calls.append((len(out) - 1, r, Request(ids, params, key=r.key)))
    results = self._sample([req for _, _, req in calls])
    for (i, r, _), completions in zip(calls, results):
      out[i] = [self._rollout(c, r.max_steps) for c in completions]
    return out

  def cut_rollout(self, text: str, max_steps: int) -> tuple[str, str | None]:
    """(text up to where the search would end it, its answer): through the first step with a boxed answer, or
    through the `max_steps`-th step; the answer is that last step's (None when it has none)."""
    kept: list[str] = []
    steps, last = 0, ""
    for piece in text.split(self.delimiter):
      kept.append(piece)
      if piece.strip():
        steps, last = steps + 1, piece
        if boxed_answer(piece) is not None or steps >= max_steps:
          break
    answer = verifier.extract_answer(last, fallbacks=self.answer_fallbacks) if last else None
    return self.delimiter.join(kept), answer

  def _rollout(self, c: Completion, max_steps: int) -> Rollout:
    text, answer = self.cut_rollout(c.text, max(1, max_steps))
    return Rollout(text, list(c.token_ids), answer, c.finish_reason == "eos")

  def _sample(self, requests: list[Request]) -> list[list[Completion]]:
    return self.sampler.sample(requests) if requests else []


class LMVoter:
  """A `linearize.Vote` by the policy: n sampled votes per prompt (one user turn each), cached per prompt."""

  def __init__(self, sampler: Sampler, *, temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 128,
               seed: int = 0, system: str = ""):
    self.sampler, self.system = sampler, system
    self.temperature, self.top_p, self.max_new_tokens, self.seed = temperature, top_p, max_new_tokens, seed
    self.cache: dict[tuple[str, int], list[str]] = {}
    self.calls = 0

  def _ids(self, prompt: str) -> list[int]:
    messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
        {"role": "user", "content": prompt}]
    tok = self.sampler.tokenizer
    return tok.encode_prompt(tok.chat(messages))

  def prefetch(self, prompt_texts: Sequence[str], n: int) -> None:
    """Sample the votes of every prompt not cached yet, in one sample call."""
    todo = list(dict.fromkeys(p for p in prompt_texts if (p, n) not in self.cache))
    if not todo:
      return
    context = self.sampler.cfg.max_position_embeddings
    requests = []
    for p in todo:
      ids = self._ids(p)
      room = max(1, min(self.max_new_tokens, context - len(ids)))
      ids = ids[-(context - room):]  # a prompt longer than the context loses its start (and its votes say no)
      requests.append(Request(ids, SamplingParams(temperature=self.temperature, top_p=self.top_p,
                                                  max_new_tokens=room, n=n, seed=self.seed),
                              key=["self_eval", _digest(p)]))
    self.calls += 1
    for p, completions in zip(todo, self.sampler.sample(requests)):
      self.cache[(p, n)] = [c.text for c in completions]

  def __call__(self, prompt_texts: list[str], n: int) -> list[list[str]]:
    self.prefetch(prompt_texts, n)
    return [list(self.cache[(p, n)]) for p in prompt_texts]


def self_eval_prompts(records: Sequence[dict], template: str) -> list[str]:
  """The prompts `linearize.make_self_eval` will ask for these trees' correct terminals (to `prefetch` them)."""
  from astro_jax.search import linearize
  out = []
  for record in records:
    tree = linearize.TreeIndex(record)
    for node in tree.terminals():
      if tree.nodes[node].get("correct") is True:
        solution = "\n\n".join(s.strip() for s in tree.path_texts(node))
        out.append(template.format(problem=tree.problem.strip(), solution=solution))
  return out


class LMRewriter:
  """A `render.Rewrite` by the policy: `render.rewrite_prompt` as one user turn, the reply up to the delimiter."""

  def __init__(self, sampler: Sampler, *, template: str = render.REWRITE_PROMPT, temperature: float = 0.0,
               max_new_tokens: int = 256, seed: int = 0, delimiter: str = STEP_DELIMITER):
    self.sampler, self.template, self.delimiter = sampler, template, delimiter
    self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
    self.calls = 0

  def __call__(self, context: str, step: str) -> str:
    text = render.rewrite_prompt(context, step, self.template)
    tok = self.sampler.tokenizer
    ids = tok.encode_prompt(tok.chat([{"role": "user", "content": text}]))
    room = self.sampler.cfg.max_position_embeddings - len(ids)
    if room < 1:
      return step
    params = SamplingParams(temperature=self.temperature, max_new_tokens=min(self.max_new_tokens, room),
                            stop=(self.delimiter,), seed=self.seed)
    self.calls += 1
    completion = self.sampler.sample([Request(ids, params, key=["rewrite", _digest(text)])])[0][0]
    return completion.text.strip() or step


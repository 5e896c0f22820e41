r"""`mcts` stage: problems -> search trees (step-level MCTS with the policy model) -> ASTRO chains of thought.

  python -m astro_jax.main --config=configs/mcts.py --config.checkpoint=CKPT --config.input=problems.jsonl \
      --config.output_dir=OUT [--config.limit=N --config.search.k=8 ...]

Input: a JSONL with `id`, `problem`, `answer` per row, or a bundled benchmark name (math500, amc23, aime24, gsm8k:
test sets -- fine for trying the stage, not for training data); `limit` takes the first N problems.
`batch_problems` trees are searched at once (finished ones are replaced from the queue), each round makes one
sampler call for every tree's expansions and one for all their new children's rollouts (`astro_jax.search.mcts`);
the policy is `search.policy.LMPolicy` with the few-shot prompt of `prompt.*`; the verifier is a long-lived
`VerifierPool`, memoised on (answer, gold).

Outputs in `output_dir`:
  trees.jsonl       one record per problem {"id", "problem", "answer", "nodes": [...]} (node fields in
                    `search.tree`), appended and fsynced AS EACH TREE FINISHES;
  tree_stats.jsonl  per finished tree: {"id", "iterations", "rounds", "tokens_sampled"} (appended just before its
                    tree, so the summary's token count survives a resume);
  sft.jsonl         the ASTRO mix per solved tree (`render.dataset_rows`: messages, id, k, n_backtracks, tree_id,
                    kind, events), written atomically at the end;
  direct.jsonl      count-matched direct traces from the same trees (the Direct-SFT ablation), atomically;
  summary.json      solved fraction, nodes / terminals / correct terminals / distinct wrong answers per tree,
                    tokens sampled, time in the sampler, sampler calls per round, rows, k histogram;
  run_config.json   the settings that shape the TREES (checkpoint, tokenizer, input, model.dtype, search.*,
                    prompt.*).

Resume. A killed run restarts where it stopped: problems with a tree in trees.jsonl are skipped (a torn last line is
dropped), and a tree's samples are seeded by (search.seed, the problem, its iteration, the node) -- never by the
batch it was searched in -- so the resumed trees.jsonl holds the same trees as an uninterrupted run's (in finishing
order; compare by id). Bit for bit when the batches are the same (batch_problems = 1, or a resume at a batch
boundary); otherwise the model's log-probs, hence the priors, can differ in their last bits (XLA's matmul results
depend on the batch shape), which changes a tree only where two choices tie to float precision (measured on CPU:
same nodes, texts and tokens, priors within 1e-6 relative).
Output with other tree settings is refused unless `overwrite`. sft.jsonl, direct.jsonl and summary.json are derived
from the trees of THIS run's problems on every run, so changing `linearize.*`, `self_eval.*`, `render.*` or
`rewrite.*` and rerunning re-derives them without searching again (the model is loaded only when self-evaluation or
rewriting needs it).

Context check (before the model loads): every problem's search prompt + (search.max_depth - 1) x
search.step_max_tokens + max(search.step_max_tokens, search.rollout_max_tokens) must fit the model's context: the
longest state the search can build (a node at the depth limit's parent, whose every step used its whole budget, plus
one more step or a rollout). Requests that would still overrun it (grafted rollout steps are longer than steps) get the
room left (see `search.policy`).

Multi-host: every process runs the same search (the sampler's results are identical on all processes) and reads
trees.jsonl to resume, so `output_dir` must be visible to every host; process 0 alone writes, and the set of
finished problems it sees is broadcast and checked on the others.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import ml_collections
from tqdm import tqdm

from astro_jax.errors import UserError
from astro_jax import config_keys
from astro_jax.config_keys import Key, Keys, all_of, at_least, changed, given, satisfies
from astro_jax.search import linearize, render
from astro_jax.search.mcts import SearchConfig
from astro_jax.stages import common

# What shapes the trees: a resumed run must use the same. Derived outputs (sft/direct/summary) are rebuilt each run.
_RUN_KEYS = ("checkpoint", "tokenizer", "input", "search", "prompt")
RESULT_FILES = ("trees.jsonl", "tree_stats.jsonl", "sft.jsonl", "direct.jsonl", "summary.json")
TEMPLATE_KINDS = ("reflection", "negative", "positive", "backtrack", "restart")

_SEARCH, _RENDER, _TEMPLATES = SearchConfig(), render.RenderConfig(), render.Templates()  # the library's defaults
_LINEARIZE = linearize.LinearizeConfig()
_INPUT_HELP = "JSONL with id, problem, answer per row, or a bundled benchmark (math500, amc23, aime24, gsm8k)"


def _template(fields: tuple[str, ...]):
  """A str.format template with exactly `fields`: the check of a prompt template key."""
  def problem(template: str) -> str | None:
    try:
      template.format(**{f: "x" for f in fields})
    except (KeyError, IndexError, ValueError) as e:
      return (f"must be a str.format template with only {{{'}, {'.join(fields)}}} ({type(e).__name__}: {e}; double "
              f"literal braces)")
    missing = [f for f in fields if "{" + f + "}" not in template]
    return f"must contain {{{missing[0]}}}" if missing else None
  return problem


def _templates_of(kind: str):
  def problem(phrases) -> str | None:
    try:
      render.Templates.from_config({kind: phrases})
    except (ValueError, TypeError) as e:
      return str(e)
    return None
  return problem


# search.* are checked together by the search's own rules (search_config_problems), as SearchConfig checks itself.
KEYS: Keys = {
    **common.base_keys("mcts"),
    "seed": Key(0, "not used by this stage: see search.seed, linearize.seed, render.seed, self_eval.seed"),
    # required: the defaults are sized for an 8B+ policy with a long context (configs/mcts_8b.py)
    "checkpoint": Key("", "the policy model: Orbax or HF checkpoint directory, or an asset (asset:smollm2); required"),
    "tokenizer": common.TOKENIZER,
    "input": Key("", _INPUT_HELP, given("name " + _INPUT_HELP.replace("JSONL", "a JSONL", 1))),
    "limit": Key(-1, "the first N problems (-1: all)",
                 satisfies(lambda v: v >= -1 and v != 0, "must be >= 1, or -1 for all problems")),
    "output_dir": Key("outputs/mcts", "trees.jsonl, tree_stats.jsonl, sft.jsonl, direct.jsonl, summary.json, "
                      "run_config.json", all_of(given("an output directory is required"), common.not_a_file)),
    "overwrite": Key(False, "replace results made with other settings"),
    "batch_problems": Key(16, "trees searched at once; does not change results", at_least(1)),
    "batch_size": Key(64, "sampler rows per program (max batch); does not change results", at_least(1)),
    **common.MODEL_KEYS,
    **common.ENGINE_KEYS,
    "search.k": Key(_SEARCH.k, "proposals (next steps) sampled per expansion"),
    "search.rollouts": Key(_SEARCH.rollouts, "M: rollouts per new non-terminal child; its value R is their mean "
                           "reward"),
    "search.iterations": Key(_SEARCH.iterations, "expansions per tree"),
    "search.max_depth": Key(_SEARCH.max_depth, "steps; a child at this depth is terminal"),
    "search.c_puct": Key(_SEARCH.c_puct, "PUCT exploration constant"),
    "search.prior": Key(_SEARCH.prior, "PUCT prior: 'policy' (softmax of length-normalised step log-probs) or "
                        "'uniform'"),
    "search.leaves_per_tree": Key(_SEARCH.leaves_per_tree, "expansions per tree per round (> 1: virtual loss)"),
    "search.graft_rollouts": Key(_SEARCH.graft_rollouts, "add rollout paths to the tree as nodes"),
    "search.length_terminal": Key(_SEARCH.length_terminal, "a step cut by search.step_max_tokens ends its branch (no "
                                  "answer: reward 0)"),
    "search.stop_after_correct": Key(_SEARCH.stop_after_correct, "finish a tree once it has this many correct "
                                     "terminals (0: never)"),
    "search.step_delimiter": Key(_SEARCH.step_delimiter, "the text between steps (a step ends at it)"),
    "search.seed": Key(_SEARCH.seed, "with (problem, iteration, node) the seed of every sample"),
    "search.temperature": Key(_SEARCH.temperature, "sampling temperature of steps and rollouts"),
    "search.top_p": Key(_SEARCH.top_p, "nucleus mass of steps and rollouts, in (0, 1]"),
    "search.step_max_tokens": Key(_SEARCH.step_max_tokens, "token budget of one step"),
    "search.rollout_max_tokens": Key(_SEARCH.rollout_max_tokens, "token budget of one rollout"),
    **changed(common.prompt_keys(worked_example=True), helps={
        "prompt.instruction": "appended to every problem (example and real) in the search prompt",
        "prompt.example_problem": "the few-shot example's problem (an earlier chat turn; \"\": zero-shot)",
        "prompt.example_solution": "the example's solution: steps separated by the delimiter, a boxed final answer",
        "prompt.system": "system message of the search prompt (\"\": none)"}),
    "linearize.ks": Key(tuple(_LINEARIZE.ks), "backtracks k of the traces per solved tree (0 = a direct trace)",
                        satisfies(lambda ks: len(ks) > 0 and all(k >= 0 for k in ks),
                                  "must be a non-empty tuple of k >= 0")),
    "linearize.attempts": Key(_LINEARIZE.attempts, "draws per trace before a duplicate of an earlier trace is dropped",
                              at_least(1)),
    "linearize.seed": Key(_LINEARIZE.seed, "seed of the traces' draws"),
    "self_eval.enabled": Key(True, "keep only correct solutions the policy itself judges correct"),
    "self_eval.votes": Key(8, "votes sampled per correct solution", at_least(1)),
    "self_eval.rule": Key("unanimous", "'unanimous' (every vote yes) or 'majority' (more than half)",
                          satisfies(lambda v: v in ("unanimous", "majority"), "must be 'unanimous' or 'majority'")),
    "self_eval.prompt": Key(linearize.SELF_EVAL_PROMPT, "vote prompt with {problem} and {solution}; a vote ends with "
                            "'Verdict: Yes/No'", _template(("problem", "solution"))),
    "self_eval.temperature": Key(0.7, "sampling temperature of the votes", at_least(0)),
    "self_eval.max_new_tokens": Key(256, "token budget of one vote", at_least(1)),
    "self_eval.seed": Key(0, "seed of the votes"),
    "render.q_threshold": Key(_RENDER.q_threshold, "positive reflection after an intermediate step with Q >= this"),
    "render.min_visits": Key(_RENDER.min_visits, "positive reflections only after steps whose Q rests on >= this many "
                             "samples (0: search.rollouts, the M rollouts of one new child), never on one grafted "
                             "rollout", at_least(0, "0: search.rollouts")),
    "render.max_positive_per_segment": Key(_RENDER.max_positive_per_segment, "at most this many positive reflections "
                                           "per forward segment", at_least(0)),
    "render.positive_final": Key(_RENDER.positive_final, "positive reflection after the final answer"),
    "render.quote_words": Key(_RENDER.quote_words, "longest quote of the target step in a backtrack sentence (words)",
                              at_least(1)),
    "render.seed": Key(_RENDER.seed, "seed of the phrase choices"),
    **{f"render.templates.{kind}": Key(tuple(getattr(_TEMPLATES, kind)), f"paraphrases of the {kind} phrase"
                                       + (" (with {step})" if kind == "backtrack" else ""), _templates_of(kind))
       for kind in TEMPLATE_KINDS},
    "rewrite.enabled": Key(False, "smooth each rendered step with the policy (one sample call per step)"),
    "rewrite.prompt": Key(render.REWRITE_PROMPT, "few-shot rewriting prompt with {context} and {step} (literal braces "
                          "doubled)", _template(("context", "step"))),
    "rewrite.temperature": Key(0.0, "0 = greedy", at_least(0)),
    "rewrite.max_new_tokens": Key(256, "token budget of one rewritten step", at_least(1)),
    **common.VERIFIER_KEYS,
}


def defaults() -> ml_collections.ConfigDict:
  return config_keys.defaults(KEYS)


# --- config -> objects --------------------------------------------------------------------------------------------

def search_config(c: ml_collections.ConfigDict):
  from astro_jax.search.mcts import SearchConfig
  return SearchConfig(**c.search.to_dict())


def prompt_config(c: ml_collections.ConfigDict):
  from astro_jax.prompts import PromptConfig
  return PromptConfig(**c.prompt.to_dict())


def linearize_config(c: ml_collections.ConfigDict):
  from astro_jax.search.linearize import LinearizeConfig
  return LinearizeConfig(seed=c.linearize.seed, ks=tuple(c.linearize.ks), attempts=c.linearize.attempts)


def render_config(c: ml_collections.ConfigDict):
  from astro_jax.search import render
  r = c.render
  return render.RenderConfig(q_threshold=r.q_threshold, min_visits=r.min_visits, rollouts=c.search.rollouts,
                             max_positive_per_segment=r.max_positive_per_segment,
                             positive_final=r.positive_final, quote_words=r.quote_words, seed=r.seed,
                             templates=render.Templates.from_config(r.templates.to_dict()))


def user_prompt(c: ml_collections.ConfigDict):
  """The SFT rows' user turn: the problem with the search prompt's instruction, zero-shot."""
  from astro_jax.prompts import PromptConfig
  bare = PromptConfig(instruction=c.prompt.instruction, example_problem="", system="")
  return lambda problem: bare.messages(problem)[-1]["content"]


# --- checks -------------------------------------------------------------------------------------------------------

def check(config: ml_collections.ConfigDict) -> None:
  """Config values (each key's own check, the search's rules, the worked example), before anything is read."""
  from astro_jax import verifier
  from astro_jax.search.mcts import search_config_problems
  common.check_base(config, KEYS)
  common.require_none(search_config_problems(config.search), "search.")
  p = config.prompt
  if p.example_problem:
    common.require(bool(p.example_solution.strip()), "prompt.example_solution", p.example_solution,
                   "an example problem needs its solution")
    common.require(verifier.extract_answer(p.example_solution, fallbacks=("boxed",)) is not None,
                   "prompt.example_solution", p.example_solution[-60:],
                   "must end with a boxed final answer (the search's terminals are steps with \\boxed{})")


load_problems = common.load_input_problems  # input + limit, every problem with an answer


def check_context(config, problems, tokenizer, max_positions: int) -> None:
  """The longest state the search can build must fit the model's context (see the module docstring)."""
  from astro_jax.prompts import search_prompt_ids
  s, prompt = config.search, prompt_config(config)
  growth = (s.max_depth - 1) * s.step_max_tokens + max(s.step_max_tokens, s.rollout_max_tokens)
  for p in problems:
    n = len(search_prompt_ids(tokenizer, prompt, p.problem))
    if n + growth > max_positions:
      raise UserError(
          f"{config.input}: problem {p.id!r}: search prompt of {n} tokens + (search.max_depth - 1) x "
          f"search.step_max_tokens ({s.max_depth - 1} x {s.step_max_tokens}) + max(search.step_max_tokens, "
          f"search.rollout_max_tokens) ({max(s.step_max_tokens, s.rollout_max_tokens)}) = {n + growth} > the "
          f"model's context of {max_positions} positions; lower search.max_depth, search.step_max_tokens or "
          f"search.rollout_max_tokens")


def settings(config: ml_collections.ConfigDict) -> dict:
  values = common.to_settings(config, _RUN_KEYS, ("checkpoint", "tokenizer", "input"))
  values["model.dtype"] = config.model.dtype
  return values


# --- run ----------------------------------------------------------------------------------------------------------

@common.stage_run
def run(config: ml_collections.ConfigDict) -> dict:
  """Search, write trees as they finish, then derive sft/direct/summary; returns the summary."""
  from astro_jax import data, files, verifier
  from astro_jax.search import mcts as mcts_lib
  from astro_jax.search.policy import LMPolicy

  began = time.perf_counter()
  check(config)
  problems = load_problems(config)
  ckpt, model_cfg = common.inspect_checkpoint(config)
  tokenizer = common.load_tokenizer(config, ckpt, model_cfg)
  check_context(config, problems, tokenizer, model_cfg.max_position_embeddings)
  search_cfg = search_config(config)
  out_dir = Path(config.output_dir)
  paths = {name: out_dir / name for name in RESULT_FILES}
  record = common.SettingsRecord(out_dir / "run_config.json", settings(config), config.overwrite)
  common.claim_output(config)
  record.check(list(paths.values()), "output_dir")
  sharder = common.setup_mesh(config, "sample")  # multi-host start before anything asks JAX about processes
  writer = common.is_writer()

  done: dict[str, dict] = {}
  stats: dict[str, dict] = {}
  if record.matches():
    wanted = {p.id: p for p in problems}
    for row in data.read_jsonl_rows(paths["trees.jsonl"], missing_ok=True):
      p = wanted.get(str(row.get("id")))
      if p is not None and (row.get("problem") != p.problem or row.get("answer") != p.answer):
        raise UserError(f"{paths['trees.jsonl']}: the tree of problem {p.id!r} was searched for another problem "
                        f"text or answer than {config.input} now has; use another output_dir or --config.overwrite")
      if p is not None:
        done[p.id] = row
    stats = {str(r["id"]): r for r in data.read_jsonl_rows(paths["tree_stats.jsonl"], missing_ok=True)}
  common.agree_with_process_0([p.id in done for p in problems], "finished trees")
  todo = [p for p in problems if p.id not in done]
  resumed = len(done)

  state: dict[str, Any] = {}

  def get_sampler():
    if "sampler" not in state:
      model = common.load_model(config, ckpt, sharder)
      state["sampler"] = common.make_sampler(config, model, tokenizer, sharder=sharder, max_batch=config.batch_size,
                                             dtype=config.model.dtype, keep_completions=True)
    return state["sampler"]

  if writer:
    out_dir.mkdir(parents=True, exist_ok=True)
  rounds: list = []
  calls_per_round: list[int] = []
  with verifier.VerifierPool(config.verifier.workers, config.verifier.timeout_s) as pool:
    judge = mcts_lib.MemoJudge(mcts_lib.pool_judge(pool))
    if todo:
      sampler = get_sampler()
      policy = LMPolicy(sampler, prompt_config(config), delimiter=search_cfg.step_delimiter)
      queue = collections.deque(todo)
      problem_bar = tqdm(total=len(problems), initial=resumed, desc="mcts problems", unit="tree", disable=not writer)
      round_bar = tqdm(desc="mcts rounds", unit="round", disable=not writer)
      with mcts_lib.BatchedSearch(policy, judge, search_cfg) as engine:
        while queue or engine.active:
          if queue and len(engine.active) < config.batch_problems:
            # New trees join: the trees from here on start with no kept prefixes, so that no tree's samples
            # depend on trees searched before it (a resumed run never saw them; reuse is exact only up to the
            # last bits of the logits).
            sampler.forget_prefixes()
          while queue and len(engine.active) < config.batch_problems:
            p = queue.popleft()
            engine.add({"id": p.id, "problem": p.problem, "answer": p.answer})
          calls = sampler.stats.calls
          finished = engine.step_round()
          calls_per_round.append(sampler.stats.calls - calls)
          rs = engine.stats[-1]
          round_bar.update(1)
          round_bar.set_postfix(trees=rs.trees, new_nodes=rs.new_nodes, sampler_calls=calls_per_round[-1],
                                refresh=False)
          for result in finished:
            rec = json.loads(json.dumps(result.record()))  # exactly what a resumed run reads back
            st = {"id": result.problem_id, "iterations": result.iterations, "rounds": result.rounds,
                  "tokens_sampled": result.tokens_sampled}
            if writer:
              record.record(stale=list(paths.values()))
              data.append_jsonl(paths["tree_stats.jsonl"], st)
              data.append_jsonl(paths["trees.jsonl"], rec)
            done[result.problem_id], stats[result.problem_id] = rec, st
            problem_bar.update(1)
        rounds = list(engine.stats)
      round_bar.close()
      problem_bar.close()
    elif writer:
      record.record(stale=list(paths.values()))  # nothing left to search: the trees on disk are this run's

    records = [done[p.id] for p in problems]
    summary = search_summary(records, stats, rounds, calls_per_round, resumed, judge)
    summary.update(derive(config, records, judge, get_sampler, paths if writer else None))

  summary["sampler"] = sampler_summary(state.get("sampler"))
  summary["wall_s"] = time.perf_counter() - began
  summary["settings"] = {"search": config.search.to_dict(), "linearize": config.linearize.to_dict(),
                         "self_eval": {k: v for k, v in config.self_eval.to_dict().items() if k != "prompt"},
                         "rewrite_enabled": config.rewrite.enabled}
  if writer:
    files.write_text_atomic(paths["summary.json"], json.dumps(summary, indent=2, default=str) + "\n")
    print(f"mcts: {summary['solved']}/{summary['problems']} problems solved ({summary['solved_fraction']:.0%}), "
          f"{summary['terminals_per_tree']:.1f} terminals and {summary['distinct_wrong_answers_per_tree']:.1f} "
          f"distinct wrong answers per tree; {summary['sft_rows']} sft rows, {summary['direct_rows']} direct rows; "
          f"{summary['sampler']['tokens']} tokens in {summary['sampler']['seconds']:.0f} s of sampling "
          f"({summary['wall_s']:.0f} s in all) -> {out_dir}")
  logging.info("wrote %s", out_dir)
  return summary


def derive(config, records: list[dict], judge, get_sampler, paths: dict | None) -> dict:
  """sft.jsonl and direct.jsonl from the trees (self-evaluation and rewriting by the policy when enabled)."""
  from astro_jax import data
  from astro_jax.search import linearize, render
  from astro_jax.search.policy import LMRewriter, LMVoter, self_eval_prompts

  def equal(a: str, b: str) -> bool:
    return judge([(a, b)])[0]

  self_eval = rewrite = None
  s = config.self_eval
  solved = [r for r in records if any(n["correct"] is True for n in r["nodes"])]
  vote_calls = 0
  if s.enabled and solved:
    voter = LMVoter(get_sampler(), temperature=s.temperature, max_new_tokens=s.max_new_tokens, seed=s.seed)
    voter.prefetch(self_eval_prompts(solved, s.prompt), s.votes)
    self_eval = linearize.make_self_eval(voter, s.votes, s.rule, s.prompt)
  if config.rewrite.enabled and solved:
    w = config.rewrite
    rewrite = LMRewriter(get_sampler(), template=w.prompt, temperature=w.temperature,
                         max_new_tokens=w.max_new_tokens, seed=config.search.seed,
                         delimiter=config.search.step_delimiter)
  sft, direct = render.dataset_rows(records, lin_config=linearize_config(config), render_config=render_config(config),
                                    equal=equal, self_eval=self_eval, rewrite=rewrite,
                                    user_prompt=user_prompt(config))
  if self_eval is not None:
    vote_calls = voter.calls
  if paths is not None:
    data.write_jsonl_atomic(paths["sft.jsonl"], sft)
    data.write_jsonl_atomic(paths["direct.jsonl"], direct)
  ks = collections.Counter(row["k"] for row in sft)
  return {"sft_rows": len(sft), "direct_rows": len(direct), "k_histogram": {str(k): ks[k] for k in sorted(ks)},
          "trees_with_rows": len({row["tree_id"] for row in sft}), "solved_before_self_eval": len(solved),
          "self_eval_calls": vote_calls, "rewrite_calls": rewrite.calls if rewrite is not None else 0}


def search_summary(records, stats, rounds, calls_per_round, resumed, judge) -> dict:
  from astro_jax.search import mcts as mcts_lib
  from astro_jax.search.tree import Tree
  trees = [Tree.from_record(r) for r in records]
  tokens = [int(stats.get(str(r["id"]), {}).get("tokens_sampled", 0)) for r in records]
  out = mcts_lib.summarize(trees, tokens_sampled=tokens, rounds=rounds,
                           equal=lambda a, b: judge([(a, b)])[0])
  out["resumed_trees"] = resumed
  out["sampler_calls_per_round"] = ({"min": min(calls_per_round), "max": max(calls_per_round),
                                     "mean": sum(calls_per_round) / len(calls_per_round)}
                                    if calls_per_round else None)
  return out


def sampler_summary(sampler) -> dict:
  """This run's sampler totals (zeros when nothing was sampled)."""
  from astro_jax.sampler import SamplerStats
  st = sampler.stats if sampler is not None else SamplerStats()
  return {"calls": st.calls, "batches": st.batches, "rows": st.rows, "tokens": st.tokens, "seconds": st.seconds,
          "live_row_fraction": st.live_row_fraction}

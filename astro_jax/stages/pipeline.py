r"""`pipeline` stage: the whole recipe in one command, as thin wiring over the stages' `run` functions.

  python -m astro_jax.main --config=configs/demo.py [--config.output_dir=RUN --config.sft.optimizer.lr=3e-5 ...]

One config holds every stage's config as a sub-config (`mcts`, `sft`, `difficulty`, `rl`, `eval`: each exactly that
stage's keys and defaults) plus the pipeline's own keys: `checkpoint` (the base model), `problems` (train JSONL: the
search's problems and the RL prompts), `test` (held-out JSONL or benchmark names), `arms`, `prompt.*` (the one
prompt of the search, the pass-rate filter, RL and every eval; the SFT rows' user turn is its instruction alone),
`output_dir`, `overwrite` and the shared `mesh`, `distributed`, `compile_cache_dir`. The keys it passes each stage
(checkpoint, inputs, output_dir, overwrite, resume, prompt, mesh, distributed, compile_cache_dir, export_hf) are its
own: a value set for them in a sub-config is refused.

Layout of RUN (`output_dir`):
  mcts/               the search on `problems` (trees.jsonl, sft.jsonl, direct.jsonl, ...)
  base/eval/          eval of `checkpoint` on `test`
  <arm>/sft/          fine-tune of `checkpoint` on mcts/sft.jsonl (arm astro) or mcts/direct.jsonl (arm direct)
  <arm>/eval_sft/     eval of <arm>/sft/hf on `test`
  <arm>/difficulty/   pass rates of <arm>/sft/hf on `problems`: prompts.jsonl
  <arm>/rl/           RL of <arm>/sft/hf on <arm>/difficulty/prompts.jsonl
  <arm>/eval_rl/      eval of <arm>/rl/hf on `test`
                      (<arm>/seed<N>/... with `seed` N >= 0: replicate N of the arms, every seed of their stages N;
                      replicates share mcts/ and base/eval/, each run skipping what an earlier one finished)
  pipeline.json       {"config": ..., "stages": [{"name", "dir", "status", "wall_s", "compile_s", "started", "ended",
                      "settings", "inputs", ...}]}, rewritten atomically as each stage starts and ends
  report.*            `astro_jax.report.write_report`, after every stage and at the end

Before the first model loads: the pipeline's keys and every stage's `check` on its composed sub-config, the problems
and test files, a test set sharing a problem text (whitespace and case aside) with the train problems (a leak), the
prompts against the base model's context (the search's longest state, eval / difficulty prompt + response budget,
rl's max_prompt_tokens + response budget, sft's rows); then, holding RUN's lock, what earlier runs left in it.

Reruns. A stage's entry in pipeline.json records the settings it ran with (its sub-config) and its inputs (resolved
path + content fingerprint); `done` is written once its run returns, with a digest of the stage's own
run_config.json. A rerun SKIPS a stage that is done with the same settings and inputs, whose run_config.json is
unchanged and whose outputs are there, without loading a model; RUNS a stage that is not done (a killed stage
resumes through its own resume logic, so a SIGKILLed pipeline rerun with the same command ends with the numbers of
an uninterrupted one); and REFUSES a done stage whose settings changed, naming the stage and the key, unless
`overwrite`, which redoes that stage and the stages fed by it (their entries say `stale` until they run), no other.
A redo records the digest of the run_config.json it replaces (`replacing`): killed before its first result, when the
stage's old results are still there, it is redone again. Keys that change no output (batch sizes, worker counts,
checkpoint cadence, mesh) are not settings here.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ml_collections

from astro_jax import config_keys, stages
from astro_jax.config_keys import Key, Keys, all_of, changed, given, satisfies
from astro_jax.errors import ConfigError, UserError
from astro_jax.report import arm_dir
from astro_jax.stages import common

SUBCONFIGS = ("mcts", "sft", "difficulty", "rl", "eval")  # sub-configs: each that stage's keys and defaults
ARMS = ("astro", "direct")
SFT_DATA = {"astro": "sft.jsonl", "direct": "direct.jsonl"}  # what each arm fine-tunes on, from mcts/
SHARED = ("compile_cache_dir", "mesh", "distributed")  # the pipeline's values, passed to every stage
SEEDED = {"sft": ("seed",), "difficulty": ("sampling.seed",), "rl": ("seed", "sampling.seed")}  # from `seed` >= 0
# Keys the pipeline sets in each sub-config; a user value there is refused.
SET_HERE = {"mcts": ("checkpoint", "input", "prompt"), "eval": ("checkpoint", "benchmarks", "prompt"),
            "sft": ("checkpoint", "data", "resume", "export_hf"),
            "difficulty": ("checkpoint", "input", "prompt"),
            "rl": ("checkpoint", "prompts", "resume", "export_hf", "prompt")}
ALWAYS_SET = ("stage", "output_dir", "overwrite") + SHARED
# Inputs of each stage, compared by resolved path + content fingerprint (common.describe_input).
INPUTS = {"mcts": ("checkpoint", "tokenizer", "input"), "eval": ("checkpoint", "tokenizer", "benchmarks"),
          "sft": ("checkpoint", "tokenizer", "data", "eval_data"),
          "difficulty": ("checkpoint", "tokenizer", "input"),
          "rl": ("checkpoint", "tokenizer", "prompts", "eval.benchmarks")}
# Keys that change no output of a finished stage (besides the inputs, compared by content, and ALWAYS_SET).
NO_EFFECT = ("resume", "batch_size", "batch_problems", "verifier.workers", "save_every", "keep", "async_checkpoint",
             "sampler.max_batch", "peak_flops", "accelerator")
OUTPUTS = {"mcts": ("sft.jsonl", "direct.jsonl", "summary.json"), "eval": ("summary.json",), "sft": ("hf",),
           "difficulty": ("prompts.jsonl", "summary.json"), "rl": ("hf",)}  # present in a finished stage's dir
DONE = ("done", "skipped")  # statuses of a finished stage (skipped: found finished by a later run)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

KEYS: Keys = {  # the pipeline's own keys; each sub-config is that stage's KEYS (SUBCONFIGS)
    **changed(common.base_keys("pipeline"), drop=("seed",),  # every stage has its own seeds
              helps={"compile_cache_dir": "JAX's persistent compilation cache of every stage (\"\": off); a "
                                          "restarted run does not recompile"}),
    "seed": Key(-1, "a replicate N >= 0 of the arms: their stages go under <arm>/seed<N>/ with every seed of theirs "
                "(sft.seed, difficulty.sampling.seed, rl.seed, rl.sampling.seed) N; mcts/ and base/eval/ are shared "
                "by every replicate (run once, then skipped); -1: the stages' own seeds, arms under <arm>/",
                satisfies(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1, "must be an integer "
                          ">= -1")),
    "checkpoint": Key("", "the base model (mcts policy, base eval, start of both arms' sft): Orbax or HF directory, "
                      "or an asset (asset:smollm2); required", given("the base model is required")),
    "problems": Key("", "train problems: JSONL with id, problem, answer (the search's problems and the RL prompts); "
                    "required", satisfies(lambda v: bool(v.strip()), "a JSONL of train problems is required")),
    "test": Key("", "held-out problems: JSONL paths or benchmark names (math500, amc23, aime24, gsm8k), "
                "comma-separated; must share no problem with `problems`; required",
                satisfies(lambda v: bool(v.strip()), "held-out problems (JSONL or benchmark names) are required")),
    "arms": Key("astro", "astro (ASTRO traces), direct (the count-matched direct traces), or astro,direct: one mcts "
                "run for both"),
    "output_dir": Key("", "the run directory: mcts/, base/eval/, <arm>/{sft,eval_sft,difficulty,rl,eval_rl}/, "
                      "pipeline.json; required",
                      all_of(given("a run directory is required"), common.not_a_file)),
    "overwrite": Key(False, "redo finished stages whose settings changed, and the stages they feed (else those are "
                     "refused)"),
    **changed(common.prompt_keys(worked_example=True), helps={
        "prompt.instruction": "appended to every problem (search, difficulty, rl, eval; the SFT rows' user turn)",
        "prompt.example_solution": "the example's solution: steps separated by blank lines, a boxed final answer"}),
}


def _renamed() -> dict[str, str]:
  """The sub-stages' other spellings, as pipeline keys (`eval.sampling.n` -> `eval.samples`)."""
  out = {}
  for name in SUBCONFIGS:
    for old, new in getattr(stages.get(name), "RENAMED", {}).items():
      out[f"{name}.{old}"] = new if new.split(".")[0] in SET_HERE[name] else f"{name}.{new}"
  return out


RENAMED = _renamed()


def defaults() -> ml_collections.ConfigDict:
  c = config_keys.defaults(KEYS)
  for name in SUBCONFIGS:
    c[name] = stages.get(name).defaults()
  return c


# --- the stages of a run ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
  """One stage run of the pipeline: `name` (e.g. astro/sft) is also its directory under RUN."""
  name: str
  stage: str                          # the stage module: mcts, eval, sft, difficulty, rl
  config: ml_collections.ConfigDict   # its composed config
  needs: tuple[str, ...]              # the steps whose outputs it reads

  @property
  def out(self) -> Path:
    return Path(self.config.output_dir)


def arms(config: ml_collections.ConfigDict) -> list[str]:
  chosen = [a.strip() for a in config.arms.split(",") if a.strip()]
  common.require(bool(chosen) and all(a in ARMS for a in chosen) and len(set(chosen)) == len(chosen), "arms",
                 config.arms, f"must be {ARMS[0]}, {ARMS[1]} or {ARMS[0]},{ARMS[1]}")
  return [a for a in ARMS if a in chosen]


def compose(config: ml_collections.ConfigDict, stage: str, name: str, **values) -> ml_collections.ConfigDict:
  """The config of step `name`: the `stage` sub-config with the pipeline's values (`values`, output_dir, shared keys,
  prompt) set."""
  c = ml_collections.ConfigDict(config[stage].to_dict())
  c.output_dir = str(Path(config.output_dir) / name)
  for key in SHARED + (("prompt",) if "prompt" in SET_HERE[stage] else ()):
    value = config[key]
    c[key] = ml_collections.ConfigDict(value.to_dict()) if isinstance(value, ml_collections.ConfigDict) else value
  for key, value in values.items():
    c[key] = value
  return c


def take(sub: ml_collections.ConfigDict, source: ml_collections.ConfigDict, stage: str) -> None:
  """A stage config's values (e.g. configs/sft_8b.py's) into the pipeline's sub-config `sub` of that stage, but for
  the keys the pipeline sets itself."""
  own = set(SET_HERE[stage]) | set(ALWAYS_SET)
  for key, value in _flat(source.to_dict()).items():
    if key.split(".")[0] in own:
      continue
    *parents, leaf = key.split(".")
    node = sub
    for p in parents:
      node = node[p]
    node[leaf] = value


def plan(config: ml_collections.ConfigDict) -> list[Step]:
  """Every step of the run, in order; each step's inputs are its predecessors' outputs."""
  run = Path(config.output_dir)
  out = [Step("mcts", "mcts", compose(config, "mcts", "mcts", checkpoint=config.checkpoint, input=config.problems), ()),
         Step("base/eval", "eval", compose(config, "eval", "base/eval", checkpoint=config.checkpoint,
                                           benchmarks=config.test), ())]
  for arm in arms(config):
    at = arm_dir(arm, config.seed)
    sft_hf, rl_hf = str(run / at / "sft" / "hf"), str(run / at / "rl" / "hf")
    out += [
        Step(f"{at}/sft", "sft", compose(config, "sft", f"{at}/sft", checkpoint=config.checkpoint,
                                         data=str(run / "mcts" / SFT_DATA[arm]), export_hf=True), ("mcts",)),
        Step(f"{at}/eval_sft", "eval", compose(config, "eval", f"{at}/eval_sft", checkpoint=sft_hf,
                                               benchmarks=config.test), (f"{at}/sft",)),
        Step(f"{at}/difficulty", "difficulty", compose(config, "difficulty", f"{at}/difficulty", checkpoint=sft_hf,
                                                       input=config.problems), (f"{at}/sft",)),
        Step(f"{at}/rl", "rl", compose(config, "rl", f"{at}/rl", checkpoint=sft_hf, export_hf=True,
                                       prompts=str(run / at / "difficulty" / "prompts.jsonl")),
             (f"{at}/sft", f"{at}/difficulty")),
        Step(f"{at}/eval_rl", "eval", compose(config, "eval", f"{at}/eval_rl", checkpoint=rl_hf,
                                              benchmarks=config.test), (f"{at}/rl",))]
  for step in out if config.seed >= 0 else ():
    for key in SEEDED.get(step.stage, ()):
      parent, _, leaf = key.rpartition(".")
      (config_keys.value(step.config, parent) if parent else step.config)[leaf] = config.seed
  return out


def dependents(steps: list[Step], name: str) -> set[str]:
  """The steps fed, directly or not, by step `name`."""
  fed: set[str] = set()
  for step in steps:
    if name in step.needs or fed & set(step.needs):
      fed.add(step.name)
  return fed


# --- checks before any work ---------------------------------------------------------------------------------------

def check(config: ml_collections.ConfigDict) -> None:
  """The pipeline's own keys and the keys it sets in the sub-configs, before anything is read."""
  common.check_base(config, KEYS)
  arms(config)
  for name in SUBCONFIGS:
    reference = stages.defaults(name)
    for key in ALWAYS_SET + SET_HERE[name]:
      value, default = _plain(config[name][key]), _plain(reference[key])
      if value != default:
        raise ConfigError(f"config key '{name}.{key}' = {value!r}: the pipeline sets it (inputs, output_dir, "
                          f"overwrite/resume, prompt, mesh, distributed, compile_cache_dir, export_hf); remove it from "
                          f"the sub-config (set the pipeline's own key, e.g. checkpoint, problems, test, prompt.*)")
    for key in SEEDED.get(name, ()) if config.seed >= 0 else ():
      value, default = config_keys.value(config[name], key), config_keys.value(reference, key)
      if value != default:
        raise ConfigError(f"config key '{name}.{key}' = {value!r}: with seed = {config.seed} the pipeline sets it "
                          f"(every seed of the arms' stages is the replicate's); remove one of the two")


def _plain(value: Any) -> Any:
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def check_steps(steps: list[Step]) -> None:
  """Each stage's own value checks on its composed config; errors name the pipeline's key."""
  for step in steps:
    try:
      stages.get(step.stage).check(step.config)
    except ConfigError as e:
      raise ConfigError(_pipeline_key(str(e), step.stage)) from None


def _pipeline_key(message: str, stage: str) -> str:
  """'config key 'optimizer.lr' ...' of stage sft -> 'config key 'sft.optimizer.lr' ...' (keys the pipeline sets,
  such as prompt.*, keep the pipeline's name)."""
  head = "config key '"
  if not message.startswith(head):
    return f"{stage}: {message}"
  key = message[len(head):].split("'", 1)[0]
  return message if key.split(".")[0] in ("prompt",) + SHARED else head + f"{stage}." + message[len(head):]


def normalized(text: str) -> str:
  return " ".join(text.split()).lower()


def check_leak(config: ml_collections.ConfigDict, train: list, test: dict[str, list]) -> None:
  """No test problem may have the text of a train problem (whitespace and case aside)."""
  by_text = {normalized(p.problem): p for p in train}
  shared = [(name, p, by_text[normalized(p.problem)]) for name, ps in test.items() for p in ps
            if normalized(p.problem) in by_text]
  if shared:
    name, t, p = shared[0]
    raise UserError(f"config key 'test' = {config.test!r}: {len(shared)} test problem(s) have the text of a train "
                    f"problem of {config.problems} (a leak), e.g. test {t.id!r} ({name}) = train {p.id!r}; remove "
                    f"them from one of the two")


def check_context(config: ml_collections.ConfigDict, steps: list[Step], train: list, test: dict[str, list]) -> None:
  """Every stage's prompts and budgets within the base model's context (inspected once, no weights read); the
  trained models share its architecture and tokenizer."""
  first = {}
  for step in steps:
    first.setdefault(step.stage, step.config)
  mcts = first["mcts"]
  ckpt, model_cfg = common.inspect_checkpoint(mcts)
  tokenizer = common.load_tokenizer(mcts, ckpt, model_cfg)
  context = model_cfg.max_position_embeddings
  stages.get("mcts").check_context(mcts, train[:mcts.limit] if mcts.limit > 0 else train, tokenizer, context)
  tests = [(name, p) for name, ps in test.items() for p in ps]
  length = prompt_lengths(config, tokenizer, train + [p for _, p in tests])
  common.check_prompt_lengths([length[p.problem] for _, p in tests], first["eval"].sampling.max_new_tokens, context,
                              lambda i: f"test {tests[i][0]}, problem {tests[i][1].id!r} (eval)")
  if "difficulty" in first:
    common.check_prompt_lengths([length[p.problem] for p in train], first["difficulty"].sampling.max_new_tokens,
                                context, lambda i: f"{config.problems}: problem {train[i].id!r} (difficulty)")
  if "rl" in first:
    check_rl_context(config, first["rl"], train, length, context)
  if "sft" in first:
    sft = first["sft"]
    rows = sft.max_length or sft.seq_len
    common.require(rows <= context, "sft.max_length" if sft.max_length else "sft.seq_len", rows,
                   f"longer than the model's context of {context} positions")


def prompt_lengths(config: ml_collections.ConfigDict, tokenizer, problems: list) -> dict[str, int]:
  """{problem text: tokens of its prompt} (the pipeline's prompt, as every sampling stage renders it)."""
  from astro_jax.search.policy import PromptConfig, search_prompt_ids
  prompt = PromptConfig(**config.prompt.to_dict())
  return {p.problem: len(search_prompt_ids(tokenizer, prompt, p.problem)) for p in problems}


def check_rl_context(config: ml_collections.ConfigDict, rl: ml_collections.ConfigDict, train: list,
                     length: dict[str, int], context: int) -> None:
  """rl's rows (max_prompt_tokens + response budget) within the context, every train prompt within its prompt room."""
  total = rl.max_prompt_tokens + rl.sampling.max_new_tokens
  common.require(total <= context, "rl.max_prompt_tokens", rl.max_prompt_tokens,
                 f"+ rl.sampling.max_new_tokens = {total} > the model's context of {context} positions")
  for p in train:
    if length[p.problem] > rl.max_prompt_tokens:
      raise UserError(f"{config.problems}: problem {p.id!r}: its prompt is {length[p.problem]} tokens > "
                      f"rl.max_prompt_tokens {rl.max_prompt_tokens}")


def load_test(config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict) -> dict[str, list]:
  """{benchmark name: problems} of `test`, as the eval stage reads them (its `limit`), named as the pipeline's key."""
  eval_stage = stages.get("eval")
  out = {}
  for spec in eval_stage.benchmark_specs(eval_config):
    name = eval_stage.benchmark_name(spec)
    common.require(name not in out, "test", config.test, f"{name!r} appears twice")
    problems = common.load_problems(spec, "test")
    out[name] = problems[:eval_config.limit] if eval_config.limit >= 0 else problems
  return out


def validate(config: ml_collections.ConfigDict) -> list[Step]:
  """Everything that can be checked before any work; the run's steps."""
  check(config)
  steps = plan(config)
  check_steps(steps)
  train = common.load_problems(config.problems, "problems")
  test = load_test(config, next(s for s in steps if s.stage == "eval").config)
  check_leak(config, train, test)
  check_context(config, steps, train, test)
  return steps


# --- what earlier runs left: skip, run (resume) or redo ------------------------------------------------------------

def settings(step: Step) -> dict:
  """The step's settings as pipeline.json records them: its config but for the inputs (see `inputs`)."""
  return json.loads(json.dumps(step.config.to_dict()))


def inputs(step: Step) -> dict:
  """The step's inputs: resolved path + content fingerprint."""
  out = {}
  for key in INPUTS[step.stage]:
    out[key] = common.describe_input(config_keys.value(step.config, key), key)
  return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix[:-1]: d}
  return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _ignored(key: str, stage: str) -> bool:
  skip = ALWAYS_SET + INPUTS[stage] + NO_EFFECT
  return any(key == k or key.startswith(k + ".") for k in skip)


def changes(entry: dict, step: Step) -> list[str]:
  """What differs between a step's record and its settings and inputs now: "key: old -> now new" each."""
  out = []
  old, new = _flat(entry.get("settings") or {}), _flat(settings(step))
  for key in sorted(set(old) | set(new)):
    if not _ignored(key, step.stage) and old.get(key) != new.get(key):
      out.append(f"{key}: {old.get(key)!r} -> now {new.get(key)!r}")
  was, now = entry.get("inputs") or {}, inputs(step)
  for key in sorted(set(was) | set(now)):
    if was.get(key) != now.get(key):
      out.append(f"{key}: {_input_text(was.get(key))} -> now {_input_text(now.get(key))}")
  return out


def _input_text(described: Any) -> str:
  if isinstance(described, list):
    return "[" + ", ".join(_input_text(d) for d in described) + "]"
  if not isinstance(described, dict):
    return repr(described)
  name = described.get("path") or described.get("benchmark") or described.get("asset")
  return f"{name} (missing)" if described.get("missing") else f"{name} (sha256 {described.get('sha256', '')[:12]})"


def record_digest(step: Step) -> str | None:
  """sha256 of the stage's own run_config.json (None when there is none)."""
  try:
    return hashlib.sha256((step.out / "run_config.json").read_bytes()).hexdigest()
  except FileNotFoundError:
    return None


def complete(step: Step, entry: dict) -> bool:
  """A finished step's outputs are all there and its own record is the one it finished with."""
  return (record_digest(step) == entry.get("record_sha256") is not None
          and all((step.out / name).exists() for name in OUTPUTS[step.stage]))


def _has_content(path: Path) -> bool:
  return path.is_dir() and any(path.iterdir())


def action(step: Step, entry: dict | None, upstream_runs: bool, overwrite: bool) -> str:
  """skip, run (fresh or resumed: the stage's own logic) or redo (overwrite) for one step."""
  if entry is None:
    return "redo" if overwrite and _has_content(step.out) else "run"
  status = entry.get("status")
  if status == "stale" or (upstream_runs and status in DONE):
    return "redo"  # what it was made from is (being) remade
  if upstream_runs:
    return "run"
  changed = changes(entry, step)
  if status in DONE:
    if changed and not overwrite:
      raise UserError(f"pipeline stage {step.name}: settings changed ({'; '.join(changed[:3])}); pass "
                      f"--config.overwrite=true to redo it and every stage after it")
    return "redo" if changed else ("skip" if complete(step, entry) else "run")
  if changed and overwrite:
    return "redo"
  replacing = entry.get("replacing")
  return "redo" if replacing is not None and record_digest(step) == replacing else "run"


def decide(steps: list[Step], previous: dict[str, dict], overwrite: bool) -> dict[str, str]:
  actions: dict[str, str] = {}
  for step in steps:
    upstream_runs = any(actions[n] != "skip" for n in step.needs)
    actions[step.name] = action(step, previous.get(step.name), upstream_runs, overwrite)
  common.agree_with_process_0([a == "skip" for a in actions.values()], "finished stages")
  common.agree_with_process_0([a == "redo" for a in actions.values()], "stages to redo")
  return actions


# --- running ------------------------------------------------------------------------------------------------------

class _CompileClock:
  """Seconds this process spent compiling XLA programs (JAX's monitoring events; one listener per process)."""
  seconds = 0.0
  _listening = False

  @classmethod
  def start(cls) -> None:
    if not cls._listening:
      import jax
      jax.monitoring.register_event_duration_secs_listener(cls._on_event)
      cls._listening = True

  @classmethod
  def _on_event(cls, event: str, duration: float, **_) -> None:
    if event == COMPILE_EVENT:
      cls.seconds += duration


def _now() -> str:
  return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Record:
  """pipeline.json: the config and one entry per step (and entries of earlier runs' other steps, kept)."""

  def __init__(self, run: Path, config: ml_collections.ConfigDict, writer: bool):
    self.path, self.writer = run / "pipeline.json", writer
    self.config = json.loads(json.dumps(config.to_dict()))
    try:
      old = json.loads(self.path.read_text())
    except FileNotFoundError:
      old = {}
    except (json.JSONDecodeError, UnicodeDecodeError):
      old = None
    if not isinstance(old, dict):
      raise UserError(f"{self.path}: not a pipeline record (a JSON object); move it away to rerun every stage")
    self.entries: dict[str, dict] = {e["name"]: e for e in old.get("stages", []) if isinstance(e, dict) and "name" in e}

  def write(self, order: list[str]) -> None:
    if not self.writer:
      return
    from astro_jax import files
    names = order + [n for n in self.entries if n not in order]
    doc = {"config": self.config, "stages": [self.entries[n] for n in names if n in self.entries]}
    self.path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(self.path, json.dumps(doc, indent=2) + "\n")


def run_step(step: Step, how: str, record: Record, order: list[str], stale: set[str]) -> None:
  """Run one stage (`how`: run or redo) between its pipeline.json entries "running" and "done"."""
  entry = {"name": step.name, "dir": step.name, "status": "running", "wall_s": None, "compile_s": None,
           "started": _now(), "ended": None, "settings": settings(step), "inputs": inputs(step),
           "replacing": None, "record_sha256": None}
  previous = record.entries.get(step.name) or {}
  if how == "redo":
    entry["replacing"] = previous.get("replacing") if previous.get("status") == "running" else None
    entry["replacing"] = entry["replacing"] or record_digest(step)
  record.entries[step.name] = entry
  for name in stale:
    if name in record.entries:
      record.entries[name]["status"] = "stale"
  record.write(order)
  if record.writer:
    print(f"pipeline: {step.name}: {'redoing' if how == 'redo' else 'running'} ({step.stage} -> {step.out})",
          flush=True)
  config = ml_collections.ConfigDict(step.config.to_dict())
  config.overwrite = how == "redo"
  if "resume" in config:
    config.resume = how != "redo"
  began, compiled = time.perf_counter(), _CompileClock.seconds
  stages.get(step.stage).run(config)
  gc.collect()
  entry.update(status="done", ended=_now(), wall_s=round(time.perf_counter() - began, 3),
               compile_s=round(_CompileClock.seconds - compiled, 3), record_sha256=record_digest(step))
  record.write(order)
  if record.writer:
    print(f"pipeline: {step.name}: done in {entry['wall_s']:.1f} s ({entry['compile_s']:.1f} s compiling)",
          flush=True)


def report(run: Path) -> None:
  """The run report (astro_jax.report) from what RUN holds now."""
  from astro_jax import report as report_lib
  report_lib.write_report(run)


def clear_leftovers(steps: list[Step], writer: bool) -> None:
  """What killed stage runs left beside their outputs (an overwritten run set aside until the new one's first result
  is put back), cleared before anything is decided from those outputs, as each stage would clear it."""
  if writer:
    from astro_jax import files
    for step in steps:
      files.remove_stale_leftovers(step.out)
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("pipeline: leftovers cleared")


@common.stage_run
def run(config: ml_collections.ConfigDict) -> None:
  steps = validate(config)
  run_dir = common.claim_output(config)
  writer = common.is_writer_of(config)
  clear_leftovers(steps, writer)
  record = Record(run_dir, config, writer)
  actions = decide(steps, record.entries, config.overwrite)
  order = [s.name for s in steps]
  _CompileClock.start()
  began = time.perf_counter()
  for step in steps:
    if actions[step.name] == "skip":
      record.entries[step.name]["status"] = "skipped"
      record.write(order)
      if writer:
        print(f"pipeline: {step.name}: skipped (done {record.entries[step.name].get('ended')}, same settings)",
              flush=True)
      continue
    run_step(step, actions[step.name], record, order, dependents(steps, step.name))
    if writer:
      report(run_dir)
  if writer:
    report(run_dir)  # at the end: with every stage's final status
    from astro_jax import report as report_lib
    print("\n" + report_lib.table_text(run_dir) + "\n", flush=True)
    ran = [n for n in order if actions[n] != "skip"]
    print(f"pipeline: {len(ran)} stage(s) run, {len(order) - len(ran)} skipped, {time.perf_counter() - began:.1f} s; "
          f"report {run_dir / 'report.md'}", flush=True)

"""Config pieces and set-up shared by all stages: value checks, mesh, multi-host start, checkpoint + tokenizer
loading, and the settings record that lets a killed run resume without ever mixing or overwriting results.

Every stage checks in this order, so that a mistake costs seconds and leaves nothing behind: config values, then
inputs (files, every row, every prompt within the context), then the checkpoint (present and well-formed, without
reading weights), then what is already at the output; only then does it load the model, and it records its
settings when it writes its first result.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import ml_collections

from astro_jax import files, sharding
from astro_jax.config_keys import Key, Keys, above, at_least, changed, check_values, group, one_of, satisfies
from astro_jax.errors import ConfigError, UserError, require

ASSET_PREFIX = "asset:"
DTYPES = ("float32", "bfloat16")


def _mesh_size(size: int) -> str | None:
  return None if size >= 1 or size == -1 else "must be >= 1, or -1 for all remaining devices"


def base_keys(stage: str) -> Keys:
  """The keys every stage has: which stage, the run seed, the mesh, the multi-host runtime, the compile cache."""
  return {
      "stage": Key(stage, "which stage runs (fixed by the config file)"),
      "seed": Key(0, "run seed (stages that sample take theirs from sampling.seed)"),
      "mesh.data": Key(1, "devices on the data axis", _mesh_size),
      "mesh.fsdp": Key(-1, "devices on the fsdp axis (-1: all remaining)", _mesh_size),
      "mesh.tensor": Key(1, "devices on the tensor axis", _mesh_size),
      "distributed.enabled": Key(False, "start JAX's multi-host runtime (one process per host)"),
      "distributed.coordinator_address": Key("", "host:port of process 0 (\"\": from the cluster environment)"),
      "distributed.num_processes": Key(-1, "number of processes (-1: from the environment)"),
      "distributed.process_id": Key(-1, "this process's index (-1: from the environment)"),
      "compile_cache_dir": Key("~/.cache/astro_jax/jax_compile", "JAX's persistent compilation cache (\"\": off); a "
                               "restarted run does not recompile"),
  }


CHECKPOINT = Key("", "Orbax or HF checkpoint directory, a training run's step (RUN/checkpoints/N), or an asset "
                 "(asset:smollm2)")
TOKENIZER = Key("", "tokenizer directory (default: the checkpoint's own)")

# How a sampling stage runs the model (the architecture comes from the checkpoint).
MODEL_KEYS: Keys = {"model.dtype": Key("float32", "the sampler's compute dtype (and its weight copy's): float32 or "
                                       "bfloat16", one_of(DTYPES))}

# Which sampler runs a sampling stage (neither changes greedy results; see astro_jax/engine.py).
ENGINE_KEYS: Keys = {
    "sampler.engine": Key("continuous", "continuous (slots refilled as rows finish, prefixes reused) or static "
                          "(batches run until their longest row stops)", one_of(("static", "continuous"))),
    "sampler.prefix_cache_mb": Key(4096.0, "continuous: memory for kept prompt/parent prefixes (0: no reuse; at most "
                                   "4 cache rows a slot)",
                                   at_least(0)),
}


def make_sampler(config: ml_collections.ConfigDict, model, tokenizer, **settings):
  """The sampler `config.sampler.engine` names, with the Sampler `settings` (sharder, max_batch, dtype, ...);
  keep_completions (search) counts for the continuous engine only."""
  from astro_jax import engine
  return engine.make_sampler(config.sampler.engine, model, tokenizer,
                             prefix_cache_mb=config.sampler.prefix_cache_mb, **settings)


# The sampling.* group (checked together by `check_sampling`, the sampler's own rules): generate's defaults, greedy.
SAMPLING_KEYS: Keys = group("sampling", {
    "temperature": Key(0.0, "0 = greedy"),
    "top_p": Key(1.0, "nucleus mass in (0, 1] (1 = off)"),
    "top_k": Key(0, "0 = off"),
    "max_new_tokens": Key(256, "token budget per completion"),
    "n": Key(1, "samples per prompt"),
    "stop": Key((), "strings that end a completion (cut before them)"),
    "seed": Key(0, "with the row's identity and sample index, all the randomness"),
})


def sampling_params(c: ml_collections.ConfigDict, **overrides):
  """A `sampling.*` group as the sampler's SamplingParams (`overrides` win, e.g. n)."""
  from astro_jax.sampler import SamplingParams
  values = dict(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_new_tokens=c.max_new_tokens,
                n=c.get("n", 1), stop=tuple(s for s in c.stop if s), seed=c.seed)
  return SamplingParams(**{**values, **overrides})


# How rl samples (T = 1, no top-p / top-k; the response budget): also difficulty's defaults, whose pass rates are of
# RL's sampling.
RL_SAMPLING_KEYS: Keys = changed(
    SAMPLING_KEYS, drop=("sampling.n",),
    defaults={"sampling.temperature": 1.0, "sampling.max_new_tokens": 1024},
    helps={"sampling.temperature": "sampling temperature (> 0; the trainer scores with the same)",
           "sampling.top_p": "nucleus mass (1: off; < 1 makes the sampler's log-probs those of a truncated "
                             "distribution)",
           "sampling.top_k": "0 = off (see top_p)",
           "sampling.max_new_tokens": "response budget (tokens); a response that reaches it is truncated",
           "sampling.stop": "strings that end a response",
           "sampling.seed": "with (epoch, problem id, sample index), all the sampling randomness"})


def prompt_keys(*, worked_example: bool = False) -> Keys:
  """The prompt (`prompts.PromptConfig`), in rl's and difficulty's words (the other stages adapt the help): by
  default zero-shot with the ASTRO instruction, exactly `prompts.math_messages` (eval, rl, difficulty); with
  worked_example, PromptConfig's default example as an earlier chat turn (the search's few-shot prompt)."""
  from astro_jax import prompts
  example = prompts.PromptConfig() if worked_example else prompts.PromptConfig(example_problem="",
                                                                                  example_solution="")
  return group("prompt", {
      "instruction": Key(example.instruction, "appended to every problem"),
      "example_problem": Key(example.example_problem, "a worked example's problem as an earlier chat turn (\"\": "
                                                     "zero-shot)"),
      "example_solution": Key(example.example_solution, "the example's solution (steps, a boxed final answer)"),
      "system": Key(example.system, "system message (\"\": none)"),
  })


VERIFIER_KEYS: Keys = group("verifier", {
    "workers": Key(2, "answer-checking subprocesses", at_least(1)),
    "timeout_s": Key(5.0, "hard limit per comparison (a timeout counts as wrong)", above(0)),
})


not_a_file = satisfies(lambda v: not Path(v).is_file(), "is a file; name a directory")  # an output directory's


# --- value checks -------------------------------------------------------------------------------------------------

def check_base(config: ml_collections.ConfigDict, keys: Keys) -> None:
  """Every key's own check (`keys`: the stage's table), then the mesh as a whole."""
  check_values(config, keys)
  sizes = [config.mesh[a] for a in sharding.MESH_AXES]
  require(sizes.count(-1) <= 1, "mesh", dict(zip(sharding.MESH_AXES, sizes)), "at most one axis may be -1")


def check_sampling(sampling: ml_collections.ConfigDict, n: int | None = None) -> None:
  """Sampling values (see sampler.sampling_problems), named `sampling.<field>`; `n` overrides sampling.n."""
  from astro_jax.sampler import sampling_problems
  fields = {k: sampling[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")}
  fields["n"] = sampling.n if n is None else n
  fields["stop"] = tuple(s for s in sampling.stop if s)
  problems = sampling_problems(ml_collections.ConfigDict(fields))
  if n is not None and "n" in problems:
    problems = {"samples": problems.pop("n"), **problems}  # this stage's name for n
  require_none(problems, "sampling.", unprefixed=("samples",))


def require_none(problems: dict[str, str], prefix: str, unprefixed: tuple[str, ...] = ()) -> None:
  """A ConfigError for the first of `problems` ({field: what is wrong}, as `sampler.sampling_problems` gives),
  named `prefix + field` (fields in `unprefixed` are top-level keys)."""
  if problems:
    field, why = next(iter(problems.items()))
    raise ConfigError(f"config key {field if field in unprefixed else prefix + field!r} {why}")


def input_file(path: str, key: str) -> Path:
  """A user-given input file that must exist and not be empty (a file of blank lines is the reader's to find)."""
  p = Path(path)
  require(p.is_file(), key, path, "no such file")
  require(p.stat().st_size > 0, key, path, "the file is empty")
  return p


PROBLEM_TEXT = ("problem", "answer")  # what every stage that loads problems needs in each row (not blank)


def load_problems(spec: str, key: str) -> list:
  """The problems of a bundled benchmark or a JSONL file given by config key `key`, every row checked (a malformed
  row, a duplicate id, a blank problem or answer is named at file:line); none at all is an error."""
  from astro_jax import data
  try:
    problems = data.load_benchmark(spec, nonblank=PROBLEM_TEXT)
  except FileNotFoundError as e:
    raise UserError(f"config key {key!r}: {e}") from None
  if not problems:
    raise UserError(f"{spec}: no problems (the file is empty or only blank lines)")
  return problems


def load_input_problems(config: ml_collections.ConfigDict) -> list:
  """The first `config.limit` problems of `config.input` (all when limit <= 0), each with a problem and an answer."""
  problems = load_problems(config.input, "input")
  return problems[:config.limit] if config.limit > 0 else problems


def benchmark_specs(benchmarks: str) -> list[str]:
  """A comma-separated `benchmarks` value: bundled names or JSONL paths."""
  return [s.strip() for s in benchmarks.split(",") if s.strip()]


def benchmark_name(spec: str) -> str:
  return Path(spec).stem if spec.endswith(".jsonl") else spec


def load_benchmarks(benchmarks: str, limit: int, key: str = "benchmarks") -> dict:
  """{benchmark name: problems (the first `limit`; -1: all)} of a comma-separated `benchmarks` value (config key
  `key`); a missing or malformed benchmark is named."""
  problems = {}
  for spec in benchmark_specs(benchmarks):
    name = benchmark_name(spec)
    require(name not in problems, key, benchmarks, f"{name!r} appears twice")
    loaded = load_problems(spec, key)
    problems[name] = loaded[:limit] if limit >= 0 else loaded
  return problems


# --- checkpoint, tokenizer, mesh ----------------------------------------------------------------------------------

def resolve_path(path: str, key: str = "checkpoint") -> Path:
  """A local path, or `asset:smollm2` (the real SmolLM2-135M-Instruct) / `asset:llama3_tokenizer`."""
  from astro_jax import assets
  if path.startswith(ASSET_PREFIX):
    name = path[len(ASSET_PREFIX):]
    table = assets.ASSET_DIRS
    require(name in table, key, path, f"unknown asset; known: {', '.join(ASSET_PREFIX + k for k in table)}")
    try:
      return Path(table[name]())
    except FileNotFoundError as e:
      raise UserError(f"config key {key!r} = {path!r}: {e}") from None
  require(bool(path), key, path, "a path is required (or an asset such as 'asset:smollm2')")
  require(Path(path).exists(), key, path, "no such file or directory")
  return Path(path)


def inspect_checkpoint(config: ml_collections.ConfigDict):
  """(path, ModelConfig) of `config.checkpoint`: present and well-formed (headers and shapes; no weights read)."""
  from astro_jax import checkpoint
  path = resolve_path(config.checkpoint)
  return path, checkpoint.inspect_checkpoint(path)


def load_tokenizer(config: ml_collections.ConfigDict, ckpt: Path, model_cfg):
  """The tokenizer of `config.tokenizer`, else the checkpoint's own (with the model's EOS ids)."""
  from astro_jax import checkpoint
  from astro_jax.tokenizer import Tokenizer
  tok_dir = resolve_path(config.tokenizer, "tokenizer") if config.tokenizer else checkpoint.tokenizer_dir_of(ckpt)
  if tok_dir is None:
    raise UserError(f"checkpoint {ckpt} has no tokenizer files; pass --config.tokenizer=DIR")
  try:
    return Tokenizer.load(tok_dir, extra_eos_ids=model_cfg.eos_token_ids)
  except (OSError, ValueError) as e:
    raise UserError(f"tokenizer {tok_dir}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load_model(config: ml_collections.ConfigDict, ckpt: Path, sharder: sharding.Sharder | None):
  """The model of an (inspected) Orbax or HF checkpoint, on the mesh."""
  from astro_jax import checkpoint
  return checkpoint.load_model(ckpt, sharder=sharder)


def setup_mesh(config: ml_collections.ConfigDict, rules: str = "train") -> sharding.Sharder:
  """Multi-host start, the persistent compilation cache, and the mesh with its rule set."""
  d = config.distributed
  sharding.enable_compilation_cache(config.compile_cache_dir)
  sharding.maybe_initialize_distributed(d.enabled, d.coordinator_address or None, d.num_processes,
                                        d.process_id)
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  except ValueError as e:
    raise ConfigError(f"config key 'mesh': {e}") from None
  logging.info("mesh %s", dict(mesh.shape))
  return sharding.Sharder.create(mesh, rules)


def is_writer() -> bool:
  """Whether this process writes the outputs (process 0; call after `setup_mesh`)."""
  import jax
  return jax.process_index() == 0


def agree_with_process_0(mask: list[bool], what: str) -> None:
  """Multi-host: every process must see the same `what` (e.g. finished problems) in output_dir as process 0, i.e.
  output_dir is storage every host reads; a UserError names the counts otherwise."""
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  mine = np.asarray(mask, np.int32)
  ref = np.asarray(multihost_utils.broadcast_one_to_all(mine))
  if not np.array_equal(ref, mine):
    raise UserError(f"process {jax.process_index()} sees {int(mine.sum())} {what} in output_dir, process 0 "
                    f"sees {int(ref.sum())}: output_dir must be on storage every host reads")


def check_prompt_lengths(lengths: list[int], max_new_tokens: int, max_positions: int,
                         where: Callable[[int], str]) -> None:
  """Every prompt + max_new_tokens within the model's context; the first that is not is named by `where(i)`."""
  for i, n in enumerate(lengths):
    if n + max_new_tokens > max_positions:
      raise UserError(f"{where(i)}: prompt of {n} tokens + sampling.max_new_tokens {max_new_tokens} = "
                      f"{n + max_new_tokens} > the model's context of {max_positions} positions")


# --- a run's output location ---------------------------------------------------------------------------------------

_RUNS: list[contextlib.ExitStack] = []  # one per stage run in progress (a pipeline nests them)


def stage_run(run: Callable) -> Callable:
  """Decorates a stage's `run(config)`: what the run claims for its output (the lock, an overwritten run set aside)
  is released, dropped or put back when it ends, however it ends (a killed run's: by the kernel and the next run)."""
  @functools.wraps(run)
  def wrapped(config: ml_collections.ConfigDict, **injected):
    with contextlib.ExitStack() as stack:
      _RUNS.append(stack)
      try:
        return run(config, **injected)
      finally:
        _RUNS.pop()
  return wrapped


def _run_stack() -> contextlib.ExitStack:
  if not _RUNS:
    raise RuntimeError("a stage's output is claimed inside its run (decorate run with common.stage_run)")
  return _RUNS[-1]


def is_writer_of(config: ml_collections.ConfigDict) -> bool:
  """Whether this process writes (multi-host: starts JAX's runtime to learn it; single-host: without JAX)."""
  d = config.distributed
  if not d.enabled:
    return True
  sharding.maybe_initialize_distributed(True, d.coordinator_address or None, d.num_processes, d.process_id)
  return is_writer()


def _process_0_says(message: str) -> str:
  """Process 0's `message` on every process (multi-host), as is otherwise."""
  import jax
  if jax.process_count() == 1:
    return message
  import numpy as np
  from jax.experimental import multihost_utils
  buf = np.zeros(2048, np.uint8)
  raw = message.encode()[:len(buf)]
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  got = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  return bytes(got).rstrip(b"\0").decode(errors="replace")


def claim_output(config: ml_collections.ConfigDict, key: str = "output_dir", *, directory: bool = True) -> Path:
  """Before any work, the output location of config key `key` (a directory, else a file): it must be writable, and
  the writer (process 0) holds its lock until the run ends, then clears what killed runs left there (a run that a
  dead overwriting run had set aside is put back). Another live run there, or an unwritable location, is one line
  (on every process) and nothing is touched."""
  out = Path(os.path.abspath(config[key]))
  problem = ""
  if is_writer_of(config):
    why = files.unwritable_reason(out, directory=directory)
    try:
      require(why is None, key, config[key], why or "")
      _run_stack().enter_context(files.output_lock(out))
      files.remove_stale_leftovers(out)
    except UserError as e:
      problem = str(e)
  problem = _process_0_says(problem)
  if problem:
    raise UserError(problem)
  return out


def replace_at_first_result(out: Path, names: tuple[str, ...]) -> Callable[[], None]:
  """Overwriting the run at `out` (writer only): its entries `names` are set aside now; the returned `done()`
  deletes them once the new run has its first result (a checkpoint); a run that ends before, failing or killed, puts
  them back untouched (and what it wrote under those names goes)."""
  aside = files.set_aside(out, names)
  pending = [aside]

  def done() -> None:
    if pending:
      files.drop_aside(pending.pop())

  def on_exit(error_type, *_) -> None:
    if pending:
      (files.drop_aside if error_type is None else files.put_back)(pending.pop())

  _run_stack().push(on_exit)
  return done


# What a training run writes in its directory (what an overwriting run replaces; nothing else there is touched).
TRAIN_RUN_ENTRIES = ("run_config.json", "data_counts.json", "metrics.jsonl", "tensorboard", "checkpoints",
                     "loss.png", "rl.png", "eval", "hf")


def prepare_run_dir(config: ml_collections.ConfigDict, settings: dict) -> tuple[Path, "SettingsRecord",
                                                                              Callable[[], None] | None]:
  """A training run's directory (sft, rl): claim it (lock) and refuse one that holds another run unless resuming it
  (same settings, or a changed learning rate / schedule) or overwriting. Returns (directory, settings record,
  `done`): when overwriting, the old run is set aside until `done()` (the new run's first checkpoint) and put back if
  the run ends before."""
  from astro_jax.train.config import RESUME_CHANGEABLE
  out = claim_output(config)
  record = SettingsRecord(out / "run_config.json", settings)
  held = [p for p in (out / "run_config.json", out / "metrics.jsonl", out / "checkpoints") if p.exists()]
  if held and not config.overwrite:
    if not config.resume:
      raise UserError(f"output_dir {out} holds a run; pass --config.resume=true to continue it or "
                      f"--config.overwrite=true to replace it")
    record.check(held, "output_dir", changeable=RESUME_CHANGEABLE)
  done = None
  if config.overwrite and out.is_dir() and is_writer_of(config):
    done = replace_at_first_result(out, TRAIN_RUN_ENTRIES)
  return out, record, done


# --- the settings record of a resumable output --------------------------------------------------------------------

FULL_HASH_BYTES = 64 * 2**20  # files up to this size are hashed whole; larger ones (weights) by sampled blocks
_BLOCK, _BLOCKS = 2**20, 16


def _file_digest(path: Path, size: int) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= FULL_HASH_BYTES:
      for chunk in iter(lambda: f.read(2**22), b""):
        h.update(chunk)
    else:
      for i in range(_BLOCKS):
        f.seek((size - _BLOCK) * i // (_BLOCKS - 1))
        h.update(f.read(_BLOCK))
  return h.hexdigest()


def fingerprint(path: Path) -> dict:
  """Content fingerprint of an input file, or of every file under a directory (a checkpoint): bytes and sha256 (of
  the whole content for files up to 64 MiB; of 16 evenly spaced 1 MiB blocks beyond, e.g. weight shards)."""
  path = Path(path)
  if path.is_file():
    size = path.stat().st_size
    return {"bytes": size, "sha256": _file_digest(path, size)}
  h, total = hashlib.sha256(), 0
  for f in sorted(p for p in path.rglob("*") if p.is_file()):
    size = f.stat().st_size
    total += size
    h.update(f"{f.relative_to(path)}\0{size}\0{_file_digest(f, size)}\n".encode())
  return {"bytes": total, "sha256": h.hexdigest()}


def describe_input(spec: str, key: str) -> Any:
  """What a settings record keeps of an input: its resolved path and fingerprint ("" stays ""); bundled benchmark
  names and assets keep their name; a comma-separated list (benchmarks) is described item by item."""
  from astro_jax import data
  spec = spec.strip()
  if not spec:
    return ""
  if key.endswith("benchmarks"):
    return [describe_input(s, key + "[]") for s in spec.split(",") if s.strip()]
  if spec in data.BENCHMARKS:
    from importlib import resources
    with resources.as_file(resources.files("astro_jax") / "datasets" / data.BENCHMARKS[spec]) as path:
      return {"benchmark": spec, **fingerprint(path)}
  if spec.startswith(ASSET_PREFIX):
    return {"asset": spec, **fingerprint(resolve_path(spec, key))}
  path = Path(os.path.abspath(spec))
  return {"path": str(path), **(fingerprint(path) if path.exists() else {"missing": True})}


def to_settings(config: ml_collections.ConfigDict, keys: tuple[str, ...], inputs: tuple[str, ...] = ()) -> dict:
  """The values of `keys` as plain JSON (what a settings record compares), each input key of `inputs` (dotted) as
  its resolved path + content fingerprint (`describe_input`), and how samples are seeded (results of an older
  seeding scheme are never mixed with new ones)."""
  from astro_jax.sampler import SEEDING
  values = {k: config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict) else config[k] for k in keys}
  values = json.loads(json.dumps({**values, "seeding": SEEDING}))
  for dotted in inputs:
    node, value = values, config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node, value = node.setdefault(p, {}), value[p]
    node[leaf] = describe_input(value[leaf], dotted)
  return values


class SettingsRecord:
  """The settings that shaped an output, in a JSON file beside it (`path`).

  A run whose output location holds results of other settings (or results of unknown origin) stops before any work
  unless `overwrite` is set; with `overwrite` the old results are removed only when the first new one is written
  (`record`). So a failed run never blocks its location and never loses what was there. A resumed training run may
  change the keys `check` is told are changeable (the optimizer's learning rate after a NaN stop): each such change
  is kept in the record's `changes` list with the step it took effect.
  """

  def __init__(self, path: Path, settings: dict, overwrite: bool = False):
    self.path, self.settings, self.overwrite = Path(path), json.loads(json.dumps(settings)), overwrite
    self._recorded = False  # set once this run has recorded (or found) its settings: `record` is then free
    self._changes: dict[str, list] = {}  # accepted changes of changeable keys: {key: [old, new]}

  def previous(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, UnicodeDecodeError):
      return {"unreadable": str(self.path)}

  def _previous_settings(self) -> dict | None:
    previous = self.previous()
    return {k: v for k, v in previous.items() if k != "changes"} if previous is not None else None

  def matches(self) -> bool:
    return self._previous_settings() == self.settings

  def check(self, results: list[Path], what: str, changeable: tuple[str, ...] = ()) -> None:
    """Refuse (UserError) when any of `results` exists and was made with other settings, unless overwriting or
    every difference is in a `changeable` key (dotted; accepted and recorded by `record`)."""
    existing = [p for p in results if p.exists()]
    if not existing or self.matches() or self.overwrite:
      return
    previous = self._previous_settings()
    if previous:
      differences = _differences(previous, self.settings)
      if changeable and all(key in changeable for key, _, _ in differences):
        self._changes = {key: [old, new] for key, old, new in differences}
        return
    origin = (f"other settings ({'; '.join(_describe(d) for d in differences)}; see {self.path})" if previous
              else f"unknown settings (no {self.path.name} beside it)")
    raise UserError(f"{what} {existing[0]} holds results of {origin}. Use another output location, or pass "
                    f"--config.overwrite=true to replace them")

  def record(self, stale: list[Path], at_step: int | None = None) -> None:
    """Before the first result is written: when overwriting other settings, remove `stale`; then record (with the
    accepted changes and `at_step`, the step they take effect). Cheap to call before every result."""
    if self._recorded or (self.matches() and not self._changes):
      self._recorded = True
      return
    for p in stale:
      p.unlink(missing_ok=True)
    record = dict(self.settings)
    if self._changes:
      history = (self.previous() or {}).get("changes", [])
      record["changes"] = history + [{"at_step": at_step, "changed": self._changes}]
    files.write_text_atomic(self.path, json.dumps(record, indent=2) + "\n")
    self._recorded = True


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted key, old, new) for every leaf where two settings records differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in sorted(set(old) | set(new), key=str)
            for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
  return [] if old == new else [(prefix[:-1] or "settings", old, new)]


def _describe(difference: tuple[str, Any, Any]) -> str:
  key, old, new = difference
  return f"{key}: {old!r} -> now {new!r}"

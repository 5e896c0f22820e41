r"""ASTRO at scale, both arms: Llama-3.1-8B-Instruct from HF weights, MATH train problems -> mcts_8b -> sft_8b ->
difficulty -> rl_8b -> eval on MATH-500, AMC 2023 and AIME 2024 with the paper's protocol.

  python -m astro_jax.main --config=configs/pipeline_8b.py[:TARGET] --config.checkpoint=HF_LLAMA31_8B_INSTRUCT \
      --config.problems=math_train.jsonl [--config.output_dir=RUN]    # TARGET: tpu_v5p (default) or h100
  python tools/plan_memory.py --config=configs/pipeline_8b.py[:TARGET]  # plans the sft and rl steps of it

Each stage's sub-config is that stage's 8B config (configs/mcts_8b.py, sft_8b.py:TARGET, rl_8b.py:TARGET: their
docstrings give the reasoning), less the keys the pipeline sets itself (checkpoints, inputs, output dirs, prompt).
One mesh serves every stage (the pipeline's `mesh`): rl_8b's, which keeps the sampler's bf16 copy split over tensor;
sft keeps sft_8b's 2 rows of 8192 tokens per batch shard per micro-batch (grad_accum 8 on the v5p mesh fsdp 4 x
tensor 4, 16 on the H100 node's fsdp 2 x tensor 4). tools/plan_memory.py plans (GiB per device): v5p sft 21.9, rl
44.6 of 95; H100 sft 31.2, rl 50.2 of 80. configs/pipeline_70b.py is the same recipe at 70B.
* problems: MATH train (id, problem, answer), decontaminated against the test sets (the pipeline refuses a test
  problem whose text is also a train problem's).
* Eval as the paper reports (§4): 16 samples per problem, T 0.6, top-p 0.95, pass@1 averaged over the 16 and maj@k
  (the report's table), responses up to rl's budget (16K tokens).
* difficulty: 8 samples per problem with rl's sampling (our choice: the paper gives no number), keep 0 < rate < 1.
"""
import os

from astro_jax import main, stages
from astro_jax.errors import ConfigError
from astro_jax.stages import pipeline

PLAN_PRESET = "llama3.1_8b"  # the architecture tools/plan_memory.py plans for (checkpoint is set by the user)
TARGETS = {"tpu_v5p": "tpu_v5p", "h100": "h100"}  # target -> sft_8b's target on the same machines
_HERE = os.path.dirname(os.path.abspath(__file__))


def _batch_shards(config) -> int:
  return config.mesh.data * config.mesh.fsdp


def build(size: str, target: str, targets: dict[str, str]):
  """The pipeline of configs/{mcts_8b, sft_<size>:targets[target], rl_<size>:target}.py on rl's mesh (sft keeps its
  rows per batch shard per micro-batch: its grad_accum is rescaled to the mesh)."""
  if target not in targets:
    raise ConfigError(f"configs/pipeline_{size}.py:{target}: unknown target; known: {', '.join(targets)}")
  load = lambda name: main.load_config_file(os.path.join(_HERE, name))
  rl, sft = load(f"rl_{size}.py:{target}"), load(f"sft_{size}.py:{targets[target]}")
  c = stages.defaults("pipeline")
  c.checkpoint = ""                     # required: the HF (or Orbax) Llama-3.1 Instruct model
  c.problems = ""                       # required: MATH train problems (JSONL)
  c.test = "math500,amc23,aime24"
  c.arms = "astro,direct"
  c.output_dir = f"outputs/pipeline_{size}_{target}"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = rl.mesh.data, rl.mesh.fsdp, rl.mesh.tensor
  c.distributed.enabled = rl.distributed.enabled
  pipeline.take(c.mcts, load("mcts_8b.py"), "mcts")
  pipeline.take(c.sft, sft, "sft")
  rows_per_shard = sft.batch_size // (sft.grad_accum * _batch_shards(sft))
  c.sft.grad_accum = sft.batch_size // (rows_per_shard * _batch_shards(c))
  pipeline.take(c.rl, rl, "rl")

  d = c.difficulty
  d.samples = 8
  d.model.dtype = "bfloat16"
  d.batch_size = rl.sampler.max_batch
  d.sampling.temperature = rl.sampling.temperature
  d.sampling.max_new_tokens = rl.sampling.max_new_tokens
  d.verifier.workers = 8

  e = c.eval
  e.samples = 16                        # pass@1 averaged over 16 samples, maj@k
  e.model.dtype = "bfloat16"
  e.batch_size = rl.sampler.max_batch
  e.sampling.temperature = 0.6
  e.sampling.top_p = 0.95
  e.sampling.max_new_tokens = rl.sampling.max_new_tokens
  e.verifier.workers = 8
  return c


def get_config(target: str = "tpu_v5p"):
  return build("8b", target, TARGETS)

r"""RL of the ASTRO SFT model (Llama-3.1-70B, the paper's): GRPO-family, G = 4, reward +1 / -1, 8K-token responses.

  python -m astro_jax.main --config=configs/rl_70b.py[:TARGET] --config.checkpoint=SFT_CKPT \
      --config.prompts=prompts.jsonl [--config.output_dir=RUN]  # TARGET: tpu_v5p (default), h100 (8 nodes) or
                                                                 # h100_128 (16 nodes); the same command on every host
  python tools/plan_memory.py --config=configs/rl_70b.py[:TARGET]  # the per-device memory plan (trainer + sampler)

SFT_CKPT: the sft stage's result (configs/sft_70b.py); prompts.jsonl: problems (id, problem, answer), e.g. the
difficulty stage's moderately difficult ones; every prompt must fit max_prompt_tokens.
Reasoning (astro_paper.md §7, anchors_rl_mcts_verify.md §A; [I] = our choice where the paper is silent; bytes
measured by tools/plan_memory.py, recorded in benchmarks/results/plan_memory.json):
* Recipe as configs/rl_8b.py: the paper's G = 4 and +1 / -1 rewards from the SFT model, DAPO's choices for the rest
  [I] (group mean / std advantages, token-mean loss, eps 0.2 / 0.28, no KL term, dynamic sampling up to 3 rounds, soft
  overlong penalty), temperature 1; AdamW at a constant 1e-6 (the notes' value for 70B), no warmup or decay, clip 1.0.
  The paper ran RL on ~256 H100 for ~10 days.
* Budget: 8192 new tokens after a prompt of at most 1024: rows of 9216 tokens. Not 16K as the 8B: with remat full a
  layer keeps its input, and the activation rules keep that residual stream whole on every tensor device (80 layers x
  T x 8192 x 2 bytes = 21 GiB at T = 17408), and the backward's working set grows with T too: one row of 17408 tokens
  plans at 73.8 GiB of step temporaries, 102.6 GiB per chip in all (does not fit a v5p); 12288 new tokens at 86.7
  GiB (9% headroom: too tight). More devices shrink the state and gradients, not a row's activations (sequence
  parallelism would). 8K covers the CoT lengths reported after RL (~6K, unverified); the overlong penalty ramps over
  the last 2048 tokens (a quarter of the budget, as the 8B's 4096 of 16K).
* Batch [I]: 64 prompts x 4 = 256 responses a step, 4 updates of 64 rows, one row per batch shard per micro-batch
  (grad_accum = 64 / fsdp); 200 steps (~1.5 epochs of 8.7K prompts). Checkpoints hold 12 bytes/param = 850 GB: every
  25 steps, 2 kept.
* Sampler: bf16 weights and KV cache, 256 rows a program. Its weight copy is split over tensor only: 141 GB / 8 =
  16.4 GiB per device whatever the node count, and a weight sync gathers the float32 masters over fsdp (36 GiB of
  temporaries). Hence tensor 8 (8 kv heads: one per device) on every target.
* Memory, per device: resident trainer state + sampler weights; on top, one at a time, the train step's temporaries,
  the weight sync's or the KV cache (tools/plan_memory.py --help). The train step is the largest here.
  - tpu_v5p: a v5p-128 slice = 64 chips of 95 GiB (16 hosts), mesh fsdp 8 x tensor 8, grad_accum 8. Plan: resident
    params 4.1 + optimizer 8.2 + sampler weights 16.4; then the step's temporaries 42.6, or the weight sync's 36.3, or
    the KV cache 11.3 (256 rows x 9216 slots; + 1.0): total 71.4 GiB, 25% headroom (82.6 if the cache were kept).
  - h100: 8 nodes x 8 H100 80 GB = 64 GPUs (one node's 640 GB cannot hold the 847 GB of state), fsdp 8 across nodes x
    tensor 8 within a node (NVLink), grad_accum 8: the same plan, 71.4 of 80 GiB, 11% headroom (82.6 with the cache
    kept: does not fit). Set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX's default 75% = 60 GB is too little). Tight:
    use h100_128 if it fails.
  - h100_128: 16 nodes = 128 GPUs, fsdp 16 x tensor 8, grad_accum 4. Plan: resident 2.1 + 4.1 + 16.4; then the step's
    38.8, or the weight sync's 36.3, or the KV cache 5.6: total 61.4 GiB, 23% headroom (67.0 with the cache kept); set
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9. The paper's 256 H100: fsdp 32 x tensor 8 (with more prompts a step to keep
    them busy).
The plan is XLA:CPU's buffer assignment of these programs (tools/plan_memory.py --help for what it cannot see); run
the first steps with the profiler before a long run.
"""
from astro_jax import stages
from astro_jax.errors import ConfigError

PLAN_PRESET = "llama3.1_70b"  # the architecture tools/plan_memory.py plans for (checkpoint is set by the user)

# target -> accelerator, mesh (data, fsdp, tensor), grad_accum (64 / grad_accum / (data x fsdp) = 1 row)
TARGETS = {
    "tpu_v5p": dict(accelerator="tpu_v5p", mesh=(1, 8, 8), grad_accum=8),    # v5p-128: 64 chips, 16 hosts
    "h100": dict(accelerator="h100", mesh=(1, 8, 8), grad_accum=8),          # 8 nodes x 8 GPUs
    "h100_128": dict(accelerator="h100", mesh=(1, 16, 8), grad_accum=4),     # 16 nodes x 8 GPUs
}


def get_config(target: str = "tpu_v5p"):
  if target not in TARGETS:
    raise ConfigError(f"configs/rl_70b.py:{target}: unknown target; known: {', '.join(TARGETS)}")
  t = TARGETS[target]
  c = stages.defaults("rl")
  c.checkpoint = ""                 # required: --config.checkpoint=SFT_CKPT
  c.prompts = ""                    # required: --config.prompts=prompts.jsonl
  c.output_dir = f"outputs/rl_70b_{target}"
  c.accelerator = t["accelerator"]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = t["mesh"]
  c.distributed.enabled = True      # every target spans hosts; addresses from the TPU / cluster environment
  c.steps = 200                     # ~1.5 epochs of the paper's 8.7K prompts
  c.batch_prompts = 64              # x G = 256 responses a step
  c.group_size = 4                  # the paper's G
  c.minibatches = 4                 # 4 updates a step, 64 rows each
  c.grad_accum = t["grad_accum"]    # 64 / grad_accum / (data x fsdp) = 1 row per batch shard per micro-batch
  c.max_prompt_tokens = 1024        # longer prompts are refused: filter them first
  c.loss_chunk = 1024               # logits of 1024 positions at a time
  c.dynamic_sampling = True         # groups with 4 equal rewards: dropped, refilled
  c.max_sampling_rounds = 3
  c.save_every = 25
  c.keep = 2
  c.model.param_dtype = "float32"   # master weights and Adam moments
  c.model.dtype = "bfloat16"        # the trainer's matmuls and activations
  c.model.remat = "full"
  c.model.attention_block = 1024    # rows of 9 x 1024 tokens: one block of scores at a time
  c.model.scan_layers = True        # one compiled layer
  c.sampler.dtype = "bfloat16"      # the sampler's weight copy and compute
  c.sampler.cache_dtype = ""        # = bfloat16
  c.sampler.max_batch = 256         # a round's 256 rows in one program
  c.sampling.temperature = 1.0
  c.sampling.top_p = 1.0
  c.sampling.top_k = 0
  c.sampling.max_new_tokens = 8192  # 16K / 12K do not fit (docstring)
  c.loss.aggregation = "token-mean"
  c.loss.eps_low = 0.2
  c.loss.eps_high = 0.28
  c.loss.scale_std = True
  c.loss.beta = 0.0                 # no KL term, no reference model
  c.reward.correct = 1.0
  c.reward.wrong = -1.0
  c.reward.overlong = "penalty"     # DAPO's soft overlong penalty
  c.reward.overlong_buffer = 2048
  c.reward.overlong_penalty = 1.0
  c.eval.every = 10
  c.eval.benchmarks = "math500"
  c.eval.limit = 100                # the first 100 problems (full: the eval stage)
  c.eval.samples = 4
  c.verifier.workers = 8            # 256 responses a round, checked on the host
  c.optimizer.lr = 1e-6             # constant
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_fraction = 0.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0
  return c

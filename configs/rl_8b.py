r"""RL of the ASTRO SFT model (Llama-3.1-8B): GRPO-family, G = 4, reward +1 / -1, responses up to 16K tokens.

  python -m astro_jax.main --config=configs/rl_8b.py[:TARGET] --config.checkpoint=SFT_CKPT \
      --config.prompts=prompts.jsonl [--config.output_dir=RUN]  # TARGET: tpu_v5p (default) or h100; on every host
  python tools/plan_memory.py --config=configs/rl_8b.py[:TARGET]  # the per-device memory plan (trainer + sampler)

SFT_CKPT: the sft stage's result (configs/sft_8b.py; its RUN/hf or an Orbax checkpoint); prompts.jsonl: problems
(id, problem, answer), e.g. the difficulty stage's moderately difficult ones; every prompt must fit max_prompt_tokens.
Reasoning (astro_paper.md §7, anchors_rl_mcts_verify.md §A; [I] = our choice where the paper is silent; bytes
measured by tools/plan_memory.py, recorded in benchmarks/results/plan_memory.json):
* Recipe as the paper: start from the SFT model, G = 4 responses per prompt, reward +1 / -1 for a right / wrong final
  answer (a missing one is wrong). The paper says only "a GRPO variant"; the rest is DAPO's [I]: group mean / std
  advantages, token-mean loss, clip-higher eps 0.2 / 0.28, no KL term (beta 0: no reference model is held), dynamic
  sampling (a group whose 4 rewards are equal has no gradient: dropped, more prompts sampled, up to 3 rounds), the
  soft overlong penalty over the last 4096 tokens of the budget (DAPO: 4096 of 20K). Temperature 1, no top-p / top-k:
  the sampler's log-probs are the trainer's distribution, so the ratio starts at 1.
* Budget: CoTs grow during RL (the paper), so 16384 new tokens (the notes: >= 16K if feasible; DAPO 20K) after a
  prompt of at most 1024 (MATH-500's longest is ~810 Llama-3 tokens with the instruction and chat turns). A training
  row is 17408 = 17 x 1024 tokens: a multiple of the attention blocks (else attention would be whole).
* Batch [I]: 64 prompts x 4 = 256 responses a step, 4 optimizer updates of 64 rows (DAPO: 512 prompts x 16, 16
  updates; fewer updates stay closer to on-policy), one row of 17408 tokens per batch shard per micro-batch (the
  token-mean loss is exact under accumulation). The paper's 8.7K prompts are 136 steps an epoch: 200 steps [I],
  ~1.5 epochs (dynamic sampling takes more prompts).
* Optimizer [I]: AdamW, constant lr 1e-6 (verl, DAPO and trl at 7B-32B; the notes: about 1e-6), no warmup, no weight
  decay, clip 1.0; float32 master weights and moments (12 bytes/param), bf16 matmuls, remat full, attention in blocks
  of 1024 queries, logits 1024 positions at a time.
* Sampler: its own bfloat16 copy of the weights, cast from the float32 masters on device each step (sampler.dtype),
  a bf16 KV cache; a round's 256 rows in one program (sampler.max_batch; 128 on H100: two programs).
* Eval [I]: MATH-500's first 100 problems x 4 samples (T 0.6, top-p 0.95, the rollout budget) every 10 steps and at
  the end (full benchmarks: the eval stage on the final checkpoint). Checkpoints (96 GB) every 20 steps, 2 kept.
* Memory, per device: on one mesh the trainer state and the sampler's weights stay resident; on top, one at a time,
  the train step's temporaries, the weight sync's, or the sampler's KV cache (dropped when decoding returns): the
  plan's total is the largest (tools/plan_memory.py --help). The sampler's copy is split over tensor only (replicated
  over fsdp): at tensor 1 each device holds all 15 GiB of bf16 weights and a weight sync gathers the float32 masters
  (31 GiB); tensor 4 divides both by 4, and each decode step reads a quarter of the weights per device.
  - tpu_v5p: a v5p-32 slice = 16 chips of 95 GiB (4 hosts), mesh fsdp 4 x tensor 4, grad_accum 16. Plan: resident
    params 1.9 + optimizer 3.7 + sampler weights 3.7; then the step's temporaries 17.5, or the KV cache 34.0 (256 rows
    x 17408 slots, 64 per batch shard; + 1.3 decode), or the weight sync's 7.5: total 44.6 GiB, 53% headroom (60.8
    if the cache were kept through the step). fsdp 16 x tensor 1: 55.7 GiB.
  - h100: one node of 8 x H100 80 GB, fsdp 2 x tensor 4 (NVLink), grad_accum 32. Plan: resident 3.7 + 7.5 + 3.7;
    then the step's 21.2, or the KV cache 34.0 (128 rows, 64 per batch shard; + 1.3), or the weight sync's 8.4: total
    50.2 GiB, 37% headroom (70.2 with the cache kept), under JAX's default GPU preallocation of 75% (60 GB). fsdp 8 x
    tensor 1: 61.3 GiB; fsdp 4 x tensor 2: 53.9 GiB.
The plan is XLA:CPU's buffer assignment of these programs (tools/plan_memory.py --help for what it cannot see); run
the first steps with the profiler before a long run.
"""
from astro_jax import stages
from astro_jax.errors import ConfigError

PLAN_PRESET = "llama3.1_8b"  # the architecture tools/plan_memory.py plans for (checkpoint is set by the user)

# target -> accelerator, mesh (data, fsdp, tensor), grad_accum, sampler rows per program, multi-host
TARGETS = {
    "tpu_v5p": dict(accelerator="tpu_v5p", mesh=(1, 4, 4), grad_accum=16, max_batch=256,
                    distributed=True),    # v5p-32: 16 chips, 4 hosts
    "h100": dict(accelerator="h100", mesh=(1, 2, 4), grad_accum=32, max_batch=128,
                 distributed=False),      # 1 node, 8 GPUs
}


def get_config(target: str = "tpu_v5p"):
  if target not in TARGETS:
    raise ConfigError(f"configs/rl_8b.py:{target}: unknown target; known: {', '.join(TARGETS)}")
  t = TARGETS[target]
  c = stages.defaults("rl")
  c.checkpoint = ""                 # required: --config.checkpoint=SFT_CKPT
  c.prompts = ""                    # required: --config.prompts=prompts.jsonl
  c.output_dir = f"outputs/rl_8b_{target}"
  c.accelerator = t["accelerator"]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = t["mesh"]
  c.distributed.enabled = t["distributed"]  # one process per host; addresses from the TPU / cluster environment
  c.steps = 200                     # ~1.5 epochs of the paper's 8.7K prompts
  c.batch_prompts = 64              # x G = 256 responses a step
  c.group_size = 4                  # the paper's G
  c.minibatches = 4                 # 4 updates a step, 64 rows each
  c.grad_accum = t["grad_accum"]    # 64 / grad_accum / (data x fsdp) = 1 row per batch shard per micro-batch
  c.max_prompt_tokens = 1024        # longer prompts are refused: filter them first
  c.loss_chunk = 1024               # logits of 1024 positions at a time
  c.dynamic_sampling = True         # groups with 4 equal rewards: dropped, refilled
  c.max_sampling_rounds = 3
  c.save_every = 20
  c.keep = 2
  c.model.param_dtype = "float32"   # master weights and Adam moments
  c.model.dtype = "bfloat16"        # the trainer's matmuls and activations
  c.model.remat = "full"
  c.model.attention_block = 1024    # rows of 17 x 1024 tokens: one block of scores at a time
  c.model.scan_layers = True        # one compiled layer
  c.sampler.dtype = "bfloat16"      # the sampler's weight copy and compute
  c.sampler.cache_dtype = ""        # = bfloat16
  c.sampler.max_batch = t["max_batch"]  # rows a program (does not change results)
  c.sampling.temperature = 1.0
  c.sampling.top_p = 1.0
  c.sampling.top_k = 0
  c.sampling.max_new_tokens = 16384 # CoTs grow during RL
  c.loss.aggregation = "token-mean"
  c.loss.eps_low = 0.2
  c.loss.eps_high = 0.28
  c.loss.scale_std = True
  c.loss.beta = 0.0                 # no KL term, no reference model
  c.reward.correct = 1.0
  c.reward.wrong = -1.0
  c.reward.overlong = "penalty"     # DAPO's soft overlong penalty
  c.reward.overlong_buffer = 4096
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

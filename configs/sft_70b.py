r"""SFT of Llama-3.1-70B-Instruct on the ASTRO search traces: the paper's run (full fine-tune, 1 epoch, lr 3e-6).

  python -m astro_jax.main --config=configs/sft_70b.py:TARGET --config.checkpoint=CKPT --config.data=sft.jsonl \
      [--config.output_dir=RUN]   # TARGET: tpu_v5p (default), h100 (4 nodes) or h100_64 (8 nodes); on every host
  python tools/plan_memory.py --config=configs/sft_70b.py:TARGET    # the per-device memory plan of this config

CKPT: an Orbax (or HF) checkpoint of Llama-3.1-70B-Instruct; sft.jsonl: the mcts stage's output.
Reasoning (astro_paper.md §6; [I] = our choice where the paper is silent; bytes measured by tools/plan_memory.py,
recorded in benchmarks/results/plan_memory.json):
* Recipe as the paper: full fine-tune, one epoch (steps=0), AdamW, lr 3e-6 with a cosine schedule, examples up to
  8192 tokens, loss on all tokens; warmup 3%, decay to 10%, no weight decay, clip 1.0 [I]. The paper ran it on
  64 H100 in about 40 minutes.
* Batch [I]: 64 packed rows of 8192 tokens = 512K tokens a step, ~200 steps in the epoch. A checkpoint holds
  12 bytes/param of state = 850 GB: one every 100 steps, 2 kept (plan 1.7 TB of disk, plus the final HF export).
* Bytes per parameter: float32 master weights (4) + Adam mu, nu in float32 (4 + 4) = 12 in the state, plus float32
  gradients of the micro-batch (4) and their accumulator (4) in the step's temporaries: 20 bytes/param at the peak.
  For 70.6B parameters: state 847 GB, 1.41 TB with the gradients (the rule of thumb "16 bytes/param" = 1.13 TB
  counts one gradient copy). 8 x H100 hold 640 GB: full fine-tuning with AdamW cannot fit on one node, whatever the
  remat; the bytes alone need >= 18 GPUs of 80 GB, and activations come on top: 4 nodes (32 GPUs) is the least that
  fits, 8 nodes (the paper's 64 GPUs) leaves headroom.
* Activations: attention materialises float32 scores [rows, heads, T, T]: at T = 8192, 16 GiB per row per layer for
  64 heads. Hence queries attend in blocks of 1024 (model.attention_block), a tensor axis (heads, MLP and
  vocabulary split over it: 64 / tensor heads per device), remat
  "full" (a layer keeps only its input: 128 MiB per row in bfloat16, x 80 layers = 10 GiB per row; the activation
  rules keep that residual stream whole on every tensor device), and one row per batch shard per micro-batch
  (grad_accum makes up the 64 rows).
* tpu_v5p: a v5p-128 slice = 64 chips of 95 GiB (16 hosts). mesh fsdp=16 x tensor=4 (tensor over the torus'
  nearest neighbours), grad_accum 4. Plan: 52 GiB per chip (params 4.1 + optimizer 8.2 + temporaries 39.3), 46%
  headroom (57 GiB with whole attention). A v5p-64 (32 chips, fsdp=8 x tensor=4, grad_accum 8) plans at 77 GiB (19% headroom): possible, tight.
* h100: 4 nodes x 8 H100 80 GB = 32 GPUs. mesh fsdp=4 (across nodes) x tensor=8 (within a node: NVLink),
  grad_accum 16. Plan: 72 GiB per GPU (params 8.2 + optimizer 16.4 + temporaries 47.0), 10% headroom: set
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX's default 75% = 60 GB is too little). Tight: use h100_64 if it fails.
* h100_64: the paper's 64 H100 = 8 nodes. mesh fsdp=8 x tensor=8, grad_accum 8. Plan: 51 GiB per GPU (params 4.1 +
  optimizer 8.2 + temporaries 38.8), 36% headroom, under JAX's default 75%.
The plan is XLA:CPU's buffer assignment of this program (see tools/plan_memory.py --help for what it cannot see);
run the first steps with the profiler before a long run.
"""
from astro_jax import stages
from astro_jax.errors import ConfigError

PLAN_PRESET = "llama3.1_70b"  # the architecture tools/plan_memory.py plans for (checkpoint is set by the user)

# target -> accelerator, mesh (data, fsdp, tensor), grad_accum (64 / grad_accum / (data x fsdp) = 1 row per shard)
TARGETS = {
    "tpu_v5p": dict(accelerator="tpu_v5p", mesh=(1, 16, 4), grad_accum=4),  # v5p-128: 64 chips, 16 hosts
    "h100": dict(accelerator="h100", mesh=(1, 4, 8), grad_accum=16),        # 4 nodes x 8 GPUs
    "h100_64": dict(accelerator="h100", mesh=(1, 8, 8), grad_accum=8),      # 8 nodes x 8 GPUs (the paper's)
}


def get_config(target: str = "tpu_v5p"):
  if target not in TARGETS:
    raise ConfigError(f"configs/sft_70b.py:{target}: unknown target; known: {', '.join(TARGETS)}")
  t = TARGETS[target]
  c = stages.defaults("sft")
  c.checkpoint = ""                 # required: --config.checkpoint=CKPT
  c.data = ""                       # required: --config.data=sft.jsonl
  c.output_dir = f"outputs/sft_70b_{target}"
  c.accelerator = t["accelerator"]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = t["mesh"]
  c.distributed.enabled = True      # every target spans hosts; addresses from the TPU / cluster environment
  c.steps = 0                       # one epoch
  c.batch_size = 64                 # packed rows per step: 64 x 8192 = 512K tokens
  c.grad_accum = t["grad_accum"]
  c.seq_len = 8192
  c.max_length = 0                  # = seq_len, the paper's maximum
  c.loss_on = "all"                 # the paper: no masking
  c.loss_chunk = 1024               # logits of 1024 positions at a time (vocabulary split over tensor)
  c.save_every = 100
  c.keep = 2
  c.model.param_dtype = "float32"   # master weights and Adam moments
  c.model.dtype = "bfloat16"        # matmuls and activations
  c.model.remat = "full"
  c.model.attention_block = 1024    # one block of queries' scores at a time: v5p plan 57 -> 52 GiB per chip
  c.model.scan_layers = True        # one compiled layer: 80 layers compile in seconds
  c.optimizer.lr = 3e-6             # the paper's
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_fraction = 0.03
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0
  return c

r"""SFT of Llama-3.1-8B-Instruct on the ASTRO search traces: full fine-tune, 1 epoch, AdamW, packed rows of 8192.

  python -m astro_jax.main --config=configs/sft_8b.py:TARGET --config.checkpoint=CKPT --config.data=sft.jsonl \
      [--config.output_dir=RUN]            # TARGET: tpu_v5p (default) or h100; the same command on every host
  python tools/plan_memory.py --config=configs/sft_8b.py:TARGET     # the per-device memory plan of this config

CKPT: an Orbax (or HF) checkpoint of Llama-3.1-8B-Instruct; sft.jsonl: the mcts stage's output.
Reasoning (astro_paper.md §6; [I] = our choice where the paper is silent; bytes measured by tools/plan_memory.py,
recorded in benchmarks/results/plan_memory.json):
* Recipe: full fine-tune, one epoch (steps=0), AdamW with a cosine schedule, examples up to 8192 tokens, loss on
  all tokens, as the paper's 70B run. The paper's lr 3e-6 is for 70B; an 8B model takes a larger step [I]: 1e-5,
  warmup 3%, decay to 10%, no weight decay, clip 1.0.
* Batch [I]: 64 packed rows of 8192 tokens = 512K tokens a step. ~36K traces of a few K tokens pack into ~13K
  rows: ~200 steps in the epoch; a checkpoint every 50 (~100 GB each: 12 bytes/param of state), 2 kept.
* Bytes per parameter: float32 master weights (4) + Adam mu, nu in float32 (4 + 4) = 12 in the state (96 GB for
  8.03B params), plus float32 gradients of the micro-batch (4) and their accumulator across micro-batches (4) in
  the step's temporaries: 20 bytes/param at the peak (~160 GB), spread over the mesh. Matmuls and activations
  run in bfloat16 (model.dtype), losses and softmax in float32.
* Activations: attention's float32 scores [rows, heads, T, T] are 8 GiB per row per layer at T = 8192 for 32
  heads, several of them live in one layer's backward. So: queries attend in blocks of 1024 (model.attention_block:
  one block's scores at a time, each block recomputed in the backward), and remat "full" (a layer keeps only its
  input, 64 MiB per row in bfloat16; the backward recomputes the layer, +1/3 FLOPs). Then TWO rows per device per
  micro-batch fit (grad_accum makes up the batch of 64; the token-mean loss is exact under accumulation).
  Measured on the v5p plan with one row per device: whole attention 47 GiB (remat none 730 GiB: no; save_dots 82
  GiB; save_layer_inputs 52 GiB), blocked attention 20 GiB; with two rows, blocked: 28 GiB.
* tpu_v5p: a v5p-32 slice = 16 chips of 95 GiB (4 hosts). mesh fsdp=16: weights, gradients and moments split 16
  ways (FSDP over the ICI torus; no tensor axis needed at 8B), 2 rows per chip, grad_accum 2. Plan: 28 GiB per
  chip (params 1.9 + optimizer 3.7 + temporaries 22.2), 71% headroom.
* h100: one node of 8 x H100 80 GB. mesh fsdp=8 over NVLink, 2 rows per GPU, grad_accum 4. Plan: 37 GiB per GPU
  (params 3.7 + optimizer 7.5 + temporaries 25.7), 54% headroom, under JAX's default GPU preallocation of 75%
  (60 GB).
The plan is XLA:CPU's buffer assignment of this program (see tools/plan_memory.py --help for what it cannot see);
run the first steps with the profiler before a long run.
"""
from astro_jax import stages
from astro_jax.errors import ConfigError

PLAN_PRESET = "llama3.1_8b"  # the architecture tools/plan_memory.py plans for (checkpoint is set by the user)

# target -> accelerator, mesh (data, fsdp, tensor), grad_accum, multi-host
TARGETS = {
    "tpu_v5p": dict(accelerator="tpu_v5p", mesh=(1, 16, 1), grad_accum=2, distributed=True),  # v5p-32: 16 chips
    "h100": dict(accelerator="h100", mesh=(1, 8, 1), grad_accum=4, distributed=False),        # 1 node, 8 GPUs
}


def get_config(target: str = "tpu_v5p"):
  if target not in TARGETS:
    raise ConfigError(f"configs/sft_8b.py:{target}: unknown target; known: {', '.join(TARGETS)}")
  t = TARGETS[target]
  c = stages.defaults("sft")
  c.checkpoint = ""                 # required: --config.checkpoint=CKPT
  c.data = ""                       # required: --config.data=sft.jsonl
  c.output_dir = f"outputs/sft_8b_{target}"
  c.accelerator = t["accelerator"]
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = t["mesh"]
  c.distributed.enabled = t["distributed"]  # one process per host; addresses from the TPU / cluster environment
  c.steps = 0                       # one epoch
  c.batch_size = 64                 # packed rows per step: 64 x 8192 = 512K tokens
  c.grad_accum = t["grad_accum"]    # 64 / grad_accum / (data x fsdp) = 2 rows per device per micro-batch
  c.seq_len = 8192
  c.max_length = 0                  # = seq_len, the paper's maximum
  c.loss_on = "all"                 # the paper: no masking
  c.loss_chunk = 1024               # logits of 1024 positions at a time: 1 x 1024 x 128256 x 4 B = 0.5 GiB
  c.save_every = 50
  c.keep = 2
  c.model.param_dtype = "float32"   # master weights and Adam moments
  c.model.dtype = "bfloat16"        # matmuls and activations
  c.model.remat = "full"
  c.model.attention_block = 1024    # one block of 1024 queries' scores at a time (2 GiB per row per layer)
  c.model.scan_layers = True        # one compiled layer
  c.optimizer.lr = 1e-5
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_fraction = 0.03
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0
  return c

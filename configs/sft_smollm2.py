"""SFT on a CPU: full fine-tune of the real SmolLM2-135M-Instruct on the real mcts output (docs/smollm2_run).

  python -m astro_jax.main --config=configs/sft_smollm2.py [--config.output_dir=OUT --config.steps=N ...]

The paper's recipe (§3.1: full fine-tune, AdamW, cosine schedule, loss on all tokens) at smoke-test size, for a
few minutes on 2 CPU cores. Every value is the stage default scaled down, for these reasons:
* Data: docs/smollm2_run/sft.jsonl, the 12 linearized search traces of configs/mcts_smollm2.py (159-489 tokens,
  3617 in all), every token a target (`loss_on` = all, the paper's choice).
* seq_len 512 holds the longest trace whole (nothing is truncated) and costs less attention per token than 1024;
  first-fit packs the traces into 9 rows (261-511 tokens, 78% of the positions real).
* Batch: 2 rows (~1000 tokens) a step, ~1 TFLOP (fwd + bwd of 135M params, the 49152-entry head included): about
  10-15 s on 2 idle cores in fp32. `steps` = 16 (32 rows, ~3.5 epochs) is a few minutes; more steps or rows are
  linear in time. Several epochs over 12 traces is memorization, not generalisation: the run shows that the loss
  falls and that the exported model is the trained one (the paper's single epoch, `steps=0`, is 4 steps here).
  (batch_size 1 would need train/data.py's grain `batch(1)` fix: grain's length of an infinite stream in one-row
  batches overflows.)
* Learning rate: the paper's 3e-6 is for a 70B model; a 135M model takes larger steps. 3e-5 moves the loss clearly
  within a few steps (tests/test_sft_real.py: 2.13 -> 0.84 nats in 5 steps on 4 traces); 10% warmup (2 steps),
  cosine decay to 10% of the peak, gradient clip 1.0 (the stage defaults).
* fp32 weights and matmuls (this CPU has no faster bf16 path), no remat (the activations of 2 x 512 tokens over 30
  layers fit in a few GB; remat would add a third to the compute), loss_chunk 512 (the vocabulary projected for
  512 positions at a time).
* Mesh: fsdp over all local devices (a plain CPU process has one). With
  XLA_FLAGS=--xla_force_host_platform_device_count=N the params and Adam moments are sharded N ways and each
  device takes whole rows, so batch_size must then be a multiple of N.
* Checkpoints at step 8 and at the end (each 1.6 GB: params and two Adam moments in fp32), written synchronously
  so step times stay clean; no compilation cache (a one-off run gains little from it).
"""
import os

from astro_jax import stages

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  c = stages.defaults("sft")
  c.checkpoint = "asset:smollm2"
  c.data = os.path.join(_REPO, "docs", "smollm2_run", "sft.jsonl")
  c.output_dir = "outputs/sft_smollm2"
  c.seq_len = 512
  c.batch_size = 2
  c.steps = 16
  c.loss_on = "all"
  c.loss_chunk = 512
  c.save_every = 8
  c.keep = 2
  c.async_checkpoint = False
  c.optimizer.lr = 3e-5
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_fraction = 0.1
  c.optimizer.final_lr_fraction = 0.1
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.compile_cache_dir = ""
  return c

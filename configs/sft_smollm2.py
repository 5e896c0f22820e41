"""SFT on a CPU: full fine-tune of the real SmolLM2-135M-Instruct on the real mcts output (docs/smollm2_run).

  python -m astro_jax.main --config=configs/sft_smollm2.py [--config.output_dir=OUT --config.steps=N ...]

A smoke-test-sized run of the paper's recipe (§3.1: full fine-tune, AdamW, cosine schedule, loss on all tokens);
it finishes in a few minutes on 2 CPU cores. Every value is the stage default scaled down, for these reasons:
* Data: docs/smollm2_run/sft.jsonl, the 12 linearized search traces of configs/mcts_smollm2.py (159-489 tokens
  each, 3617 in all). seq_len 1024 covers the longest with room to pack: first-fit packs them into 4 rows
  (1010, 1018, 859 and 730 tokens), so almost no position is padding.
* Batch: 2 packed rows (~2k tokens) a step, 2 steps an epoch. On 2 cores a step of ~2k tokens takes ~8-12 s
  (fp32, no remat), so `steps` = 24 (12 epochs over the same 12 traces) is a few minutes. 12 epochs is
  memorization, not generalisation: what this run shows is that the loss falls and the exported model is the
  trained one; the paper's single epoch (`steps=0`) over 4 rows would be 2 steps.
* Learning rate: the paper's 3e-6 is for a 70B model; smaller models take larger steps (SmolLM2's own SFT used
  ~1e-5..1e-4). 3e-5 with a 10% warmup (2 steps) and cosine decay to 10% moves the loss clearly within a few
  steps without the spikes a full-rank update of a 135M model shows at 1e-4 on so few rows.
* fp32 weights and matmuls (a CPU has no faster bf16 path here), no remat (activations of 2 x 1024 tokens over 30
  layers fit in a few GB), loss_chunk 512 (the 49152-entry vocabulary projected 512 positions at a time).
* Mesh: fsdp over all local devices (a plain CPU has 1; with
  XLA_FLAGS=--xla_force_host_platform_device_count=N it shards the weights N ways).
* Checkpoints every 12 steps (one mid-run for resume, one at the end), kept synchronous so timings are clean; no
  compilation cache directory by default (a tiny run gains little and the cache grows per shape).
"""
import os

from astro_jax import stages

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  c = stages.defaults("sft")
  c.checkpoint = "asset:smollm2"
  c.data = os.path.join(_REPO, "docs", "smollm2_run", "sft.jsonl")
  c.output_dir = "outputs/sft_smollm2"
  c.seq_len = 1024
  c.batch_size = 2
  c.steps = 24
  c.loss_on = "all"
  c.loss_chunk = 512
  c.save_every = 12
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

"""SFT of a tiny random model on CPU (tests): --config.checkpoint=TINY --config.data=sft.jsonl --config.output_dir=RUN."""
from astro_jax import stages


def get_config():
  c = stages.defaults("sft")
  c.batch_size = 4
  c.seq_len = 128
  c.loss_chunk = 32
  c.steps = 8
  c.save_every = 4
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_fraction = 0.0
  c.optimizer.schedule = "constant"
  c.mesh.fsdp = -1
  c.compile_cache_dir = ""
  return c

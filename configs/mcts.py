"""Search trees and ASTRO traces: --config.checkpoint=CKPT --config.input=problems.jsonl --config.output_dir=OUT.

The stage's defaults: the paper's search sizes as its secondary sources give them (k=8 proposals per expansion,
M=16 rollouts per new node, 32 iterations, depth 50; see configs/mcts_8b.py for the reasoning), the one-example
few-shot search prompt, self-evaluation by 8 unanimous votes, the (0, 1, 1, 2) trace mix. Sized for a pod and a
long-context policy (the checkpoint is required); on a CPU start from configs/mcts_smollm2.py.
"""
from astro_jax import stages


def get_config():
  return stages.defaults("mcts")

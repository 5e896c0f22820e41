r"""ASTRO at scale, both arms, 70B: configs/pipeline_8b.py's recipe with Llama-3.1-70B-Instruct, sft_70b and rl_70b.

  python -m astro_jax.main --config=configs/pipeline_70b.py[:TARGET] --config.checkpoint=HF_LLAMA31_70B_INSTRUCT \
      --config.problems=math_train.jsonl [--config.output_dir=RUN]   # TARGET: tpu_v5p (default), h100, h100_128
  python tools/plan_memory.py --config=configs/pipeline_70b.py[:TARGET]

One mesh for every stage: rl_70b's (tpu_v5p: v5p-128, fsdp 8 x tensor 8; h100: 8 nodes x 8; h100_128: 16 nodes x
8); sft keeps sft_70b's rows per batch shard per micro-batch (its grad_accum rescaled). The search keeps mcts_8b's
sizes (k 8, M 16, 32 iterations: the paper's secondary sources), run with the 70B policy.
tools/plan_memory.py (GiB per device): tpu_v5p sft 51.1, rl 71.4 of 95; h100 sft 51.1, rl 71.4 of 80 (11% headroom:
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, as rl_70b:h100); h100_128 sft 41.1, rl 61.4 of 80.
"""
import importlib.util
import os

PLAN_PRESET = "llama3.1_70b"
TARGETS = {"tpu_v5p": "tpu_v5p", "h100": "h100_64", "h100_128": "h100_64"}  # target -> sft_70b's on those nodes


def _pipeline_8b():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline_8b.py")
  spec = importlib.util.spec_from_file_location("_pipeline_8b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(target: str = "tpu_v5p"):
  return _pipeline_8b().build("70b", target, TARGETS)

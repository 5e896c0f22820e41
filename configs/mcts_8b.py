"""MCTS on a pod with an 8B Llama 3.1 policy: the paper's search sizes.

  python -m astro_jax.main --config=configs/mcts_8b.py --config.checkpoint=CKPT --config.input=problems.jsonl \
      --config.output_dir=OUT [--config.distributed.enabled=True]   # the same command on every host

CKPT: an Orbax (or HF) checkpoint of Llama-3.1-8B-Instruct; problems: MATH-train-style JSONL (id, problem, answer),
decontaminated against the benchmarks you evaluate on (the bundled sets are test sets).
Reasoning (astro_paper.md §3.2, §14; [I] = our choice where the paper is silent):
* k=8 proposals, M=16 rollouts per new node, 32 iterations, depth 50: the values the paper's secondary sources give
  (M=16 is corroborated twice; k, iterations and depth come from one "spec"). One expansion then costs k*M = 128
  rollouts, about 4K rollouts per tree: the rollouts are >90% of the tokens.
* c_puct 1.0 and the policy prior (softmax over siblings of length-normalised step log-probs): GAPs in the paper;
  the common PUCT choice [I]. rStar-Math uses c=2 with 12 children; raise c_puct if trees come out too narrow.
* T=0.8, top-p 0.95 [I]: eight siblings need diversity (rStar-Math: T=0.7-1.0), but an 8B model's full tail at
  T=1 yields broken steps, each of which still costs 16 rollouts.
* Budgets: 256 tokens per step, 1024 per rollout. The stage checks prompt + 49 x 256 + 1024 ~ 14K tokens against the
  context up front: fine for Llama 3.1 (128K), refused for Llama 3 8B (8K) -- lower max_depth or the budgets there.
* No grafting: the paper adds a node per proposal and uses rollouts only to estimate R; with M=16 an 8B model's
  trees have enough terminals without it.
* batch_problems 32 trees at once -> per round <= 256 step rows and <= 4096 rollout rows, i.e. one sampler call
  each, cut into programs of batch_size 256 rows (rows are split over the mesh's data x fsdp axes, weights over
  tensor). The KV cache of a row is 128 KiB per slot in bfloat16 (32 layers x 8 kv heads x 128 x 2); a typical
  rollout program (~1K prefix + 1K budget slots) then needs ~64 GiB for 256 rows: split it over 4+ chips, or lower
  batch_size on 16-32 GiB chips (and use mesh.tensor=2-4 there so that the 16 GB of weights fit beside it).
* Self-evaluation as the paper: 8 votes by the policy, kept only when unanimous (Appendix A.1 per the secondary
  sources), 512 tokens per vote; the trace mix (0, 1, 1, 2): one direct and three search traces per solved tree.
"""
from astro_jax import stages


def get_config():
  c = stages.defaults("mcts")
  c.checkpoint = ""           # required: --config.checkpoint=CKPT
  c.input = ""                # required: --config.input=problems.jsonl
  c.output_dir = "outputs/mcts_8b"
  c.model.dtype = "bfloat16"
  c.batch_problems = 32
  c.batch_size = 256
  c.search.k = 8
  c.search.rollouts = 16
  c.search.iterations = 32
  c.search.max_depth = 50
  c.search.c_puct = 1.0
  c.search.prior = "policy"
  c.search.graft_rollouts = False
  c.search.temperature = 0.8
  c.search.top_p = 0.95
  c.search.step_max_tokens = 256
  c.search.rollout_max_tokens = 1024
  c.self_eval.enabled = True
  c.self_eval.votes = 8
  c.self_eval.rule = "unanimous"
  c.self_eval.max_new_tokens = 512
  c.linearize.ks = (0, 1, 1, 2)
  return c

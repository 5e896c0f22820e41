"""RL with verifiable rewards as a library: the `RLLearner` (sample, verify, reward, update) that the `rl` stage wires
up. Here rather than in `train/` because it drives the sampler and the verifier, which `train/` (shared by sft and
rl) does not know."""

"""Search: step-level MCTS over solutions, linearization of trees into node sequences, rendering to chains of thought."""

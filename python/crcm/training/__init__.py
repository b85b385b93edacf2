"""Training: the stages of the Causal-rCM recipe and its baselines (design §1.3)."""

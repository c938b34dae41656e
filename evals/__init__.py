"""Evaluation of compressed models: perplexity and KL divergence with a recorded protocol."""

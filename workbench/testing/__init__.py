"""Models for tests: a tiny random Llama, models with a planted bias circuit, and a simulated answer model."""

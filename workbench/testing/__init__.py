"""Tiny models for tests: a random Llama and models with a planted bias circuit."""

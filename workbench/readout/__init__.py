"""Prompts and the read-out: the prompt sets, answer types and parsing, the exact and sampled read-outs."""

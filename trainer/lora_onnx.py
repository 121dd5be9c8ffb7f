"""LoRA adapters for onnxruntime-genai: a base model with adapter inputs and the adapter as an `.onnx_adapter` file.

Workflow (driven by `trainer.export.export(..., adapter=DIR)`):
1. `read_adapter(dir)` checks a PEFT LoRA folder (adapter_config.json with `peft_type` LORA, no DoRA, no
   `modules_to_save`, target modules the builder knows, a weights file) and returns its `AdapterSpec`;
2. the builder runs with `adapter_path=DIR` (it adds a MatMul(lora_A) -> MatMul(lora_B) -> Add branch beside every
   adapted projection, with lora_B already multiplied by the LoRA scaling) and with `nodes_to_exclude` naming
   those branch MatMuls (`lora_node_names`), so the adapter weights stay in the model's float type;
3. `split_adapter(onnx_dir, adapter_file)` takes each branch weight out of the graph into the `.onnx_adapter`
   file (onnxruntime's adapter format), and leaves in its place a graph input of the same name whose rank dimension
   is symbolic, backed by a rank-1 zero initializer: with no adapter active the model is the base model, with an
   adapter active (`og.Adapters(model).load(file, name)`, `generator.set_active_adapter(adapters, name)`)
   onnxruntime feeds the adapter's weights to those inputs. An adapter of another rank over the same targets fits
   the same base.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_SUFFIX = ".onnx_adapter"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json is a few kB
MAX_RANK = 1024
# PEFT module name -> the builder's node path under /model/layers.N/ (Qwen2, Llama, Mistral and their kin)
TARGETS = {
    "q_proj": "attn/q_proj",
    "k_proj": "attn/k_proj",
    "v_proj": "attn/v_proj",
    "o_proj": "attn/o_proj",
    "gate_proj": "mlp/gate_proj",
    "up_proj": "mlp/up_proj",
    "down_proj": "mlp/down_proj",
}
LORA_NODE = re.compile(r"/model/layers\.\d+/(attn|mlp)/[a-z_]+/lora_[AB]/MatMul")
RANK_DIM = "lora_rank"


@dataclass(frozen=True)
class AdapterSpec:
    """What export needs to know about a PEFT LoRA folder."""

    path: Path
    rank: int
    targets: tuple[str, ...]  # PEFT module names, sorted


def read_adapter(path: Path) -> AdapterSpec:
    """Check a PEFT LoRA folder and return its spec; raise ConfigError saying what is wrong."""
    config_path = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise ConfigError(f"adapter folder {path} does not exist")
    try:
        if config_path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{config_path} is larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a PEFT adapter folder: cannot read {ADAPTER_CONFIG}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ConfigError(f"{config_path} is not a LoRA adapter (peft_type must be LORA)")
    if config.get("use_dora"):
        raise ConfigError(f"{config_path}: DoRA adapters cannot be exported; train a plain LoRA adapter")
    if config.get("modules_to_save"):
        raise ConfigError(f"{config_path}: modules_to_save {config['modules_to_save']} cannot ship in an adapter file; "
                          "merge the adapter into the model instead")
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK or config.get("rank_pattern"):
        raise ConfigError(f"{config_path}: the rank r must be one integer from 1 to {MAX_RANK}")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list) or not targets:
        raise ConfigError(f"{config_path}: target_modules must be a list of module names, some of {sorted(TARGETS)}")
    unknown = sorted({str(t) for t in targets} - set(TARGETS))
    if unknown:
        raise ConfigError(f"{config_path}: cannot export LoRA on {unknown}; supported targets are {sorted(TARGETS)}")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ConfigError(f"{path} holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return AdapterSpec(path=path, rank=rank, targets=tuple(sorted(targets)))


def adapter_name(spec: AdapterSpec, name: str | None) -> str:
    """The adapter's file stem: `name`, else the folder's name when it is a plain name, else "adapter"."""
    if name is None:
        return spec.path.name if NAME_RE.fullmatch(spec.path.name) else "adapter"
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit")
    return name


def lora_node_names(spec: AdapterSpec, layers: int) -> list[str]:
    """The builder's names of every LoRA branch MatMul, to keep them out of int4/int8 quantization."""
    return [f"/model/layers.{i}/{TARGETS[t]}/{ab}/MatMul" for i in range(layers) for t in spec.targets
            for ab in ("lora_A", "lora_B")]


def split_adapter(onnx_dir: Path, adapter_file: Path, model_file: str = "model.onnx") -> int:
    """Move the LoRA branch weights of `onnx_dir` into `adapter_file`; return the number of parameters moved."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    path = onnx_dir / model_file
    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    params: dict[str, np.ndarray] = {}
    for node in graph.node:
        if "/lora_A/" not in node.name and "/lora_B/" not in node.name:
            continue
        if node.op_type != "MatMul" or not LORA_NODE.fullmatch(node.name) or node.input[1] not in inits:
            raise ConfigError(f"the builder wrote LoRA node {node.name} as {node.op_type}; expected a float MatMul")
        name = node.input[1]
        weight = numpy_helper.to_array(inits[name])
        params[name] = weight
        is_a = "/lora_A/" in node.name
        shape = [weight.shape[0], RANK_DIM] if is_a else [RANK_DIM, weight.shape[1]]
        default = np.zeros((weight.shape[0], 1) if is_a else (1, weight.shape[1]), dtype=weight.dtype)
        inits[name].CopyFrom(numpy_helper.from_array(default, name))
        graph.input.append(helper.make_tensor_value_info(name, inits[name].data_type, shape))
    if not params:
        raise ConfigError(f"the builder wrote no LoRA nodes into {path}; the adapter does not fit this model")

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    values = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(params[k])) for k in sorted(params)}
    adapter.set_parameters(values)
    adapter.export_adapter(str(adapter_file))

    data = f"{model_file}.data"
    for stale in (path, onnx_dir / data):
        stale.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
              size_threshold=1024)
    return len(params)

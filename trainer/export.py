"""Export a Hugging Face model folder to an onnxruntime-genai folder: int4, int8, fp16 or fp32, for cpu or cuda.

Workflow of `export(model_dir, out_dir, precision=..., ...)`:
1. check that `model_dir` is a local Hugging Face model folder (config.json with a model_type, weights, a
   tokenizer), the options against their allow-lists (`resolve_settings`: fp16 needs cuda, cuda needs
   onnxruntime-genai with CUDA), an `adapter` folder (`trainer.lora_onnx.read_adapter`) and that `out_dir` is free;
2. run `python -m onnxruntime_genai.models.builder -i MODEL -o TMP -p PRECISION -e PROVIDER -c CACHE
   --extra_options accuracy_level=4 block_size=32 [nodes_to_exclude=...] [matmul_mixed_precision=...]
   [adapter_path=...]` in a subprocess, writing into a temporary sibling of `out_dir`. The builder of
   onnxruntime-genai 0.18 takes only the unprefixed option names: `int4_block_size`, `int4_accuracy_level` and
   friends are printed back and ignored, whatever its help text says. Layers kept in float are named to
   `nodes_to_exclude`, layers kept in int8 to `matmul_mixed_precision`;
3. with an adapter, move the LoRA weights out of the graph into `<name>.onnx_adapter` (`trainer.lora_onnx`);
4. set `search.max_length` in genai_config.json, copy tokenizer files the builder did not write;
5. load the result with onnxruntime-genai (and the adapter) and generate a few tokens, write `export.json`
   (settings, versions, bytes), then rename the folder into place, so `out_dir` only ever holds a complete,
   loadable export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.errors import ConfigError
from trainer.lora_onnx import ADAPTER_SUFFIX, AdapterSpec, lora_node_names, read_adapter, split_adapter
from trainer.lora_onnx import adapter_name as lora_adapter_name

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRECISIONS = ("int4", "int8", "fp16", "fp32")
PROVIDERS = ("cpu", "cuda")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # weights per int4/int8 quantization block (the builder's allowed values)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
# Layers an int4 export can keep in float (the builder's `nodes_to_exclude` names). The embedding table is quantized
# only in int4 exports of models that tie it to the lm_head (GatherBlockQuantized is 4-bit only).
KEEP_FLOAT = {"lm_head": "/lm_head/MatMul", "embeddings": "/model/embed_tokens/Gather"}
# Layers an int4 export can quantize to int8 instead (the builder's `matmul_mixed_precision` selectors):
# "sensitive" is llama.cpp's mixed strategy (first and last eighth of the layers, every third layer's qkv/v/down).
KEEP_INT8 = {"lm_head": "last_matmul", "sensitive": "mixed_layers"}
# int4 defaults, chosen by bench.quant (docs/performance.md, "Export and quantization"): decode speed and task
# accuracy measured together on the tiny model and on a Qwen2.5-0.5B-shaped model.
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4  # CPU; the builder's default for CUDA is 0
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ()
DEFAULT_KEEP_INT8: tuple[str, ...] = ()
EXPORT_FILE = "export.json"  # what was exported and how, written into the output folder
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
DEFAULT_MAX_LENGTH = 2048  # tokens, prompt and answer together; capped at the model's context length


def check_model_dir(model_dir: Path) -> None:
    """Raise ConfigError unless `model_dir` looks like a Hugging Face causal LM folder with a tokenizer."""
    if not model_dir.is_dir():
        raise ConfigError(f"model folder {model_dir} does not exist")
    config = model_dir / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{model_dir} is not a Hugging Face model folder: cannot read {config.name}") from exc
    if not model_type:
        raise ConfigError(f"{config} names no model_type")
    if not any(any(model_dir.glob(pattern)) for pattern in WEIGHT_GLOBS):
        raise ConfigError(f"{model_dir} holds no weights (*.safetensors or pytorch_model*.bin)")
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(f"{model_dir} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")


@dataclass(frozen=True)
class ExportSettings:
    """The checked options of one export: what the builder is asked for."""

    precision: str = "int4"
    execution_provider: str = "cpu"
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    keep_float: tuple[str, ...] = ()  # names from KEEP_FLOAT, sorted
    keep_int8: tuple[str, ...] = ()  # names from KEEP_INT8, sorted

    @property
    def quantized(self) -> bool:
        return self.precision in ("int4", "int8")

    def extra_options(self, exclude: Sequence[str] = (), *, tied: bool = False) -> list[str]:
        """The builder's `--extra_options` KEY=VALUE words (unprefixed names: `int4_block_size` is ignored).
        `tied`: the model ties its embedding table to the lm_head."""
        if not self.quantized:
            return []
        words = [f"accuracy_level={self.accuracy_level}", f"block_size={self.block_size}"]
        if tied and "lm_head" in self.keep_int8:
            # The builder shares a tied table only in one precision: an int8 lm_head beside an int4 table makes it
            # point the embedding at an initializer it never writes. Untie them; the table stays int4 on its own.
            words.append("shared_embeddings=false")
            if "embeddings" not in self.keep_float:
                words.append("op_types_to_quantize=MatMul/Gather")
        nodes = [KEEP_FLOAT[name] for name in self.keep_float] + list(exclude)
        if nodes:
            words.append("nodes_to_exclude=" + ",".join(nodes))
        if self.keep_int8:
            words.append("matmul_mixed_precision=" + ",".join(f"{KEEP_INT8[n]}:int8" for n in self.keep_int8))
        return words


def _names(kind: str, given: Sequence[str], allowed: dict[str, str]) -> tuple[str, ...]:
    if isinstance(given, str):
        given = (given,)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{kind} takes {', '.join(allowed)}, not {', '.join(map(repr, unknown))}")
    return tuple(sorted(set(given)))


def cuda_available() -> bool:
    """Whether onnxruntime-genai here can run models on CUDA."""
    import onnxruntime_genai as og

    return bool(og.is_cuda_available())


def resolve_settings(
    precision: str = "int4",
    execution_provider: str = "cpu",
    block_size: int | None = None,
    accuracy_level: int | None = None,
    keep_float: Sequence[str] | None = None,
    keep_int8: Sequence[str] | None = None,
    *,
    cuda: Callable[[], bool] | None = None,
) -> ExportSettings:
    """Check the options against the allow-lists and fill in the defaults; raise ConfigError on the first bad one.
    None takes the default: the measured int4 defaults for int4, nothing kept for int8, the builder's accuracy level
    for CUDA. `cuda` tells whether CUDA is here (default: `cuda_available`)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if execution_provider not in PROVIDERS:
        raise ConfigError(f"execution provider must be one of {', '.join(PROVIDERS)}, not {execution_provider!r}")
    if precision == "fp16" and execution_provider == "cpu":
        raise ConfigError("fp16 exports run on cuda only (the builder makes no fp16 graph the CPU runs); "
                          "use --precision fp32, int8 or int4 for the CPU, or --provider cuda")
    if execution_provider == "cuda" and not (cuda or cuda_available)():
        raise ConfigError("--provider cuda needs onnxruntime-genai with CUDA (the onnxruntime-genai-cuda package and "
                          "a GPU); this one runs on the CPU only: export with --provider cpu")
    quantized = precision in ("int4", "int8")
    if not quantized and (keep_float or keep_int8):
        raise ConfigError(f"keep-float and keep-int8 choose layers of an int4 or int8 export, not of {precision}")
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    if block_size not in BLOCK_SIZES:
        raise ConfigError(f"block size must be one of {BLOCK_SIZES}, not {block_size}")
    if accuracy_level is None:
        accuracy_level = DEFAULT_ACCURACY_LEVEL if execution_provider == "cpu" else 0
    if accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy level must be one of {ACCURACY_LEVELS}, not {accuracy_level}")
    is_int4 = precision == "int4"
    floats = _names("keep-float", DEFAULT_KEEP_FLOAT if keep_float is None and is_int4 else keep_float or (),
                    KEEP_FLOAT)
    int8s = _names("keep-int8", DEFAULT_KEEP_INT8 if keep_int8 is None and is_int4 else keep_int8 or (), KEEP_INT8)
    if int8s and not is_int4:
        raise ConfigError("keep-int8 chooses layers of an int4 export; an int8 export has them in int8 already")
    if "embeddings" in floats and not is_int4:
        raise ConfigError("keep-float embeddings applies to int4 exports only; int8 exports keep embeddings in float")
    both = sorted(set(floats) & set(int8s))
    if both:
        raise ConfigError(f"{', '.join(both)} cannot be kept both in float and in int8; pick one")
    return ExportSettings(precision, execution_provider, block_size, accuracy_level, floats, int8s)


def builder_command(
    model_dir: Path, out_dir: Path, cache_dir: Path, settings: ExportSettings, *, adapter: Path | None = None,
    exclude: Sequence[str] = (), tied: bool = False,
) -> list[str]:
    """The onnxruntime-genai builder command line for `settings` (and a LoRA adapter folder)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    cmd += ["-i", str(model_dir), "-o", str(out_dir), "-p", settings.precision, "-e", settings.execution_provider,
            "-c", str(cache_dir)]
    words = settings.extra_options(exclude, tied=tied)
    if adapter is not None:
        words.append(f"adapter_path={adapter}")
    if words:
        cmd += ["--extra_options", *words]
    return cmd


def _run_builder(cmd: list[str], model_dir: Path, log_path: Path) -> None:
    """Run the builder; on failure keep its output in `log_path` and raise ConfigError naming its last line."""
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if done.returncode != 0:
        log_path.write_text(done.stdout, encoding="utf-8")
        last = (done.stdout.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            f"onnxruntime-genai builder could not export {model_dir} (exit {done.returncode}): {last} "
            f"(full log: {log_path})"
        )


def set_max_length(onnx_dir: Path, max_length: int) -> int:
    """Write `search.max_length` (capped at the context length) into genai_config.json; return it."""
    path = onnx_dir / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    context = int(config["model"].get("context_length") or max_length)
    config["search"]["max_length"] = min(max_length, context)
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return config["search"]["max_length"]


def _copy_tokenizer_files(model_dir: Path, onnx_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file() and not (onnx_dir / name).exists():
            shutil.copy2(model_dir / name, onnx_dir / name)


def _check_loads(onnx_dir: Path, adapter_file: Path | None) -> None:
    import onnxruntime_genai as og

    from trainer.evaluate import chat_prompt, generate, load

    try:
        model, tokenizer = load(onnx_dir)
        generate(model, tokenizer, chat_prompt(tokenizer, "Hello"), max_new_tokens=4)
        if adapter_file is not None:
            og.Adapters(model).load(str(adapter_file), adapter_file.stem)
    except RuntimeError as exc:  # onnxruntime-genai reports load and run failures as RuntimeError
        raise ConfigError(f"exported model in {onnx_dir} does not run in onnxruntime-genai: {exc}") from exc


def weight_bytes(folder: Path) -> int:
    """Bytes of the model's weights and graph in an export folder (model*.onnx and their external data)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith("model")
               and (p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")))


def export(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    precision: str = "int4",
    execution_provider: str = "cpu",
    block_size: int | None = None,
    accuracy_level: int | None = None,
    keep_float: Sequence[str] | None = None,
    keep_int8: Sequence[str] | None = None,
    adapter: Path | str | None = None,
    adapter_name: str | None = None,
    cache_dir: Path | str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Path:
    """Export `model_dir` to an onnxruntime-genai folder at `out_dir` and return `out_dir`.

    Options left at None take the defaults of `resolve_settings`. With `adapter` (a PEFT LoRA folder) the base is
    exported with adapter inputs and the adapter is written beside it as `<adapter_name>.onnx_adapter`."""
    src, out = Path(model_dir).resolve(), Path(out_dir).resolve()
    check_model_dir(src)
    settings = resolve_settings(precision, execution_provider, block_size, accuracy_level, keep_float, keep_int8)
    spec = read_adapter(Path(adapter).resolve()) if adapter is not None else None
    name = lora_adapter_name(spec, adapter_name) if spec else None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} already exists and is not empty; remove it or pick another")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        cache = Path(cache_dir) if cache_dir else work / "cache"
        built = work / "model"
        config = _config(src)
        exclude = lora_node_names(spec, _layers(src, config)) if spec and settings.quantized else []
        cmd = builder_command(src, built, cache, settings, adapter=spec.path if spec else None, exclude=exclude,
                              tied=bool(config.get("tie_word_embeddings")))
        _run_builder(cmd, src, out.parent / f"{out.name}.builder.log")
        adapter_file = built / f"{name}{ADAPTER_SUFFIX}" if spec else None
        if spec and adapter_file:
            split_adapter(built, adapter_file)
        set_max_length(built, max_length)
        _copy_tokenizer_files(src, built)
        _check_loads(built, adapter_file)
        _write_record(built, settings, spec, adapter_file)
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _config(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ConfigError(f"{model_dir / 'config.json'} is not a JSON object")
    return config


def _layers(model_dir: Path, config: dict) -> int:
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or not 0 < layers <= 1024:
        raise ConfigError(f"{model_dir / 'config.json'} names no num_hidden_layers from 1 to 1024")
    return layers


def _write_record(folder: Path, settings: ExportSettings, spec: AdapterSpec | None, adapter_file: Path | None) -> None:
    """export.json: the settings, the onnxruntime-genai version and the bytes of the base (and the adapter)."""
    from importlib.metadata import version

    fields = asdict(settings)
    if not settings.quantized:
        for key in ("block_size", "accuracy_level", "keep_float", "keep_int8"):
            del fields[key]
    record: dict[str, object] = {
        **fields,
        "onnxruntime_genai": version("onnxruntime-genai"),
        "weight_bytes": weight_bytes(folder),
    }
    if spec is not None and adapter_file is not None:
        record["adapter"] = {"file": adapter_file.name, "rank": spec.rank, "targets": list(spec.targets),
                             "bytes": adapter_file.stat().st_size}
    (folder / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

"""Export a Hugging Face model folder to an onnxruntime-genai folder (int4 or fp32, CPU).

Workflow of `export(model_dir, out_dir)`:
1. check that `model_dir` is a local Hugging Face model folder (config.json with a model_type, weights, a
   tokenizer) and that `out_dir` is free;
2. run `python -m onnxruntime_genai.models.builder -i MODEL -o TMP -p int4 -e cpu -c CACHE
   --extra_options accuracy_level=4 block_size=32` in a subprocess, writing into a temporary sibling of `out_dir`
   (the builder takes only the unprefixed option names; `int4_block_size` and friends are ignored silently);
3. set `search.max_length` in genai_config.json, copy tokenizer files the builder did not write;
4. load the result with onnxruntime-genai and generate a few tokens, then rename the folder into place, so
   `out_dir` only ever holds a complete, loadable export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from protocol.errors import ConfigError

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRECISIONS = ("int4", "fp32")
BLOCK_SIZES = (16, 32, 64, 128, 256)
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


def builder_command(
    model_dir: Path, out_dir: Path, cache_dir: Path, precision: str, block_size: int, accuracy_level: int
) -> list[str]:
    """The onnxruntime-genai builder command line for a CPU export."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    cmd += ["-i", str(model_dir), "-o", str(out_dir), "-p", precision, "-e", "cpu", "-c", str(cache_dir)]
    if precision == "int4":
        cmd += ["--extra_options", f"accuracy_level={accuracy_level}", f"block_size={block_size}"]
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


def _check_loads(onnx_dir: Path) -> None:
    from trainer.evaluate import chat_prompt, generate, load

    try:
        model, tokenizer = load(onnx_dir)
        generate(model, tokenizer, chat_prompt(tokenizer, "Hello"), max_new_tokens=4)
    except RuntimeError as exc:  # onnxruntime-genai reports load and run failures as RuntimeError
        raise ConfigError(f"exported model in {onnx_dir} does not run in onnxruntime-genai: {exc}") from exc


def export(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    precision: str = "int4",
    block_size: int = 32,
    accuracy_level: int = 4,
    cache_dir: Path | str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Path:
    """Export `model_dir` to an onnxruntime-genai folder at `out_dir` and return `out_dir`."""
    src, out = Path(model_dir).resolve(), Path(out_dir).resolve()
    check_model_dir(src)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if block_size not in BLOCK_SIZES:
        raise ConfigError(f"block size must be one of {BLOCK_SIZES}, not {block_size}")
    if not 0 <= accuracy_level <= 4:
        raise ConfigError(f"accuracy level must be 0 to 4, not {accuracy_level}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} already exists and is not empty; remove it or pick another")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        cache = Path(cache_dir) if cache_dir else work / "cache"
        built = work / "model"
        cmd = builder_command(src, built, cache, precision, block_size, accuracy_level)
        _run_builder(cmd, src, out.parent / f"{out.name}.builder.log")
        set_max_length(built, max_length)
        _copy_tokenizer_files(src, built)
        _check_loads(built)
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out

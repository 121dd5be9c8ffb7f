"""Fine-tune a local Hugging Face model on a user's task: LoRA, QLoRA (CUDA) or full, through PEFT or Olive.

Workflow of `finetune(base, data, out, cfg)`:
1. refuse at once, before loading anything: a bad config, an `out` that is not empty, a base that is not a local
   model folder, QLoRA without CUDA or bitsandbytes, the olive engine without olive, a leftover checkpoint without
   `resume`;
2. read the rows (`trainer.dataset.load_rows`), split off `cfg.val_fraction` by hash when no `val_data` is given,
   load the tokenizer (local files only; the pad token falls back to eos) and encode each row with the template
   (answer tokens carry the loss);
3. engine "peft": load the model (fp32 on CPU, bf16 on a CUDA device that supports it, 4-bit NF4 for QLoRA), wrap
   it with a PEFT LoRA adapter (or train every weight for "full") and run `trainer.loop.train` with its val loss,
   early stopping and resumable checkpoints in `<out>.checkpoint/`;
   engine "olive": write the rendered rows as JSONL and run `python -m olive finetune` on them in a subprocess,
   then read its PEFT adapter back and measure the val loss the same way as the peft engine does;
4. into a temporary sibling of `out`: `adapter/` (PEFT `save_pretrained`), `merged/` (the base reloaded in fp32 on
   CPU, the adapter merged into it, cast back to the base's dtype, saved with tokenizer and generation config:
   ready for `trainer.export.export`), `finetune.json` (config, sha256 of the rows, the TrainResult, sizes); then
   one rename puts the folder in place, so `out` is complete or absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import ConfigError
from trainer.dataset import Row, Template, encode, load_rows, split_rows
from trainer.loop import CHECKPOINT_FILE, TrainConfig, TrainResult

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    import torch

METHODS = ("lora", "qlora", "full")
ENGINES = ("peft", "olive")
MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")  # a target module name, matched in full
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
RESULT_FILE = "finetune.json"
OLIVE_DROPOUT = 0.05  # olive finetune's LoRA dropout, which its command line does not expose


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune: method, adapter shape, template, validation share, training, merge, engine."""

    method: str = "lora"  # "lora" | "qlora" (CUDA + bitsandbytes) | "full"
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA alpha (the update is scaled by alpha / rank)
    dropout: float = 0.05  # LoRA dropout
    target_modules: str | tuple[str, ...] = "all-linear"  # "all-linear" (every linear layer but the output) or names
    template: str = "chat"  # trainer.dataset.Template text: "chat" or a text holding {prompt} once
    val_fraction: float = 0.1  # share of the rows held out for validation when no val data is given
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: bool = True  # also write merged/ (always for "full")
    engine: str = "peft"  # "peft" (this process, trainer.loop) | "olive" (`olive finetune` in a subprocess)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainConfig(**self.train))
        modules = () if self.target_modules == "all-linear" else self.target_modules
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, not {self.method!r}"),
            (self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}"),
            (1 <= self.rank <= 1024, f"rank must be 1 to 1024, not {self.rank}"),
            (0 < self.alpha <= 4096, f"alpha must be above 0 and at most 4096, not {self.alpha}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), not {self.dropout}"),
            (0 < self.val_fraction < 1, f"val fraction must be in (0, 1), not {self.val_fraction}"),
            (isinstance(modules, tuple) and 0 < len(modules or ("x",)) <= 64
             and all(isinstance(m, str) and MODULE_RE.fullmatch(m) for m in modules),
             f"target modules are 'all-linear' or module names matching {MODULE_RE.pattern}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        Template(self.template)  # raises ConfigError on a bad template


@dataclass(frozen=True)
class FinetuneResult:
    """Where the outputs are and what the run did."""

    out: Path
    adapter: Path | None  # out/adapter for lora and qlora
    merged: Path | None  # out/merged when merged (always for full)
    train: TrainResult
    train_rows: int
    val_rows: int
    data_sha256: str  # of the train rows then the val rows, as compact JSON lines
    trainable_params: int
    total_params: int
    base_bytes: int  # bytes of the base model's weight files
    adapter_bytes: int | None  # bytes of adapter_model.safetensors


def _rows(data: Path | str | Sequence[Row]) -> list[Row]:
    return load_rows(Path(data)) if isinstance(data, (str, Path)) else list(data)


def data_digest(train: Sequence[Row], val: Sequence[Row]) -> str:
    """sha256 of the train rows, a separator and the val rows, each as a compact JSON line."""
    digest = hashlib.sha256()
    for part in (train, val):
        for row in part:
            digest.update(json.dumps(row.to_json(), separators=(",", ":"), sort_keys=True).encode() + b"\n")
        digest.update(b"--\n")
    return digest.hexdigest()


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in WEIGHT_GLOBS for p in folder.glob(pattern))


def _check_before_loading(base: Path, out: Path, cfg: FinetuneConfig, checkpoint: Path, resume: bool) -> None:
    """Every refusal that needs no model loaded."""
    from trainer.export import check_model_dir

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} already exists and is not empty; remove it or pick another")
    if not base.is_dir():
        raise ConfigError(f"base model {base} is not a folder; give a local Hugging Face model folder")
    check_model_dir(base)
    if cfg.method == "qlora":
        import torch

        if cfg.train.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("QLoRA needs a CUDA device (4-bit bitsandbytes); use method lora on this machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("QLoRA needs bitsandbytes; pip install bitsandbytes, or use method lora")
    if cfg.engine == "olive":
        if importlib.util.find_spec("olive") is None:
            raise ConfigError("the olive engine needs olive-ai; pip install 'slmops[olive]', or use engine peft")
        if cfg.method == "full" or cfg.train.patience or resume or cfg.dropout != OLIVE_DROPOUT:
            raise ConfigError("the olive engine runs lora/qlora with dropout 0.05, without early stopping or "
                              "resume; use engine peft for those")
    has_state = (checkpoint / CHECKPOINT_FILE).is_file()
    if has_state and not resume:
        raise ConfigError(f"an interrupted run left a checkpoint in {checkpoint}; resume it or remove that folder")
    if resume and not has_state:
        raise ConfigError(f"there is no checkpoint in {checkpoint} to resume from")


def load_tokenizer(base: Path) -> tuple[Any, int]:
    """The base's tokenizer (local files only) and its pad id (eos when it has no pad token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError(f"the tokenizer in {base} has neither a pad nor an eos token; add one to its config")
    return tokenizer, int(pad_id)


def load_model(base: Path, cfg: FinetuneConfig) -> torch.nn.Module:
    """The base model for training: fp32 on CPU, bf16 on a bf16 GPU (LoRA), 4-bit NF4 for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.loop import pick_device

    device, autocast = pick_device(cfg.train.device)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = autocast or torch.float16
        kwargs |= {"dtype": compute, "device_map": {"": torch.cuda.current_device()},
                   "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_use_double_quant=True,
                                                             bnb_4bit_compute_dtype=compute)}
    elif cfg.method == "lora" and device.type == "cuda" and autocast is not None:
        kwargs["dtype"] = autocast  # the frozen base in bf16; PEFT keeps the adapter weights in fp32
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def lora_config(cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def merge_adapter(base: Path, adapter: Path, out: Path, tokenizer: Any) -> Path:
    """The base reloaded in fp32 on CPU with the adapter merged in, cast to the base's dtype, saved to `out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(AutoConfig.from_pretrained(base, local_files_only=True), "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        merged = merged.to(dtype)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def finetune(
    base: Path | str,
    data: Path | str | Sequence[Row],
    out: Path | str,
    cfg: FinetuneConfig,
    *,
    val_data: Path | str | Sequence[Row] | None = None,
    checkpoint_dir: Path | str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune `base` on `data` and write adapter/, merged/ and finetune.json into `out` (complete or absent)."""
    base, out = Path(base).resolve(), Path(out).resolve()
    own_checkpoint = checkpoint_dir is None
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(out.name + ".checkpoint")
    _check_before_loading(base, out, cfg, checkpoint, resume)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the loop's rich bar is the only one
    rows = _rows(data)
    if val_data is not None:
        train_rows, val_rows = rows, _rows(val_data)
    else:
        split = split_rows(rows, val=cfg.val_fraction, test=0.0, seed=cfg.train.seed)
        train_rows, val_rows = split["train"], split["val"]
    if not train_rows:
        raise ConfigError("no rows are left for training after the validation split; give more rows or --val")
    tokenizer, pad_id = load_tokenizer(base)
    template = Template(cfg.template)
    train_ex = [encode(tokenizer, r, template, cfg.train.max_tokens) for r in train_rows]
    val_ex = [encode(tokenizer, r, template, cfg.train.max_tokens) for r in val_rows]

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if cfg.engine == "olive":
            from trainer.olive_engine import olive_finetune

            model, result = olive_finetune(base, train_rows, train_ex, val_ex, cfg, work, tokenizer=tokenizer,
                                           pad_id=pad_id)
        else:
            model, result = _peft_finetune(base, train_ex, val_ex, cfg, checkpoint, pad_id=pad_id,
                                           progress=progress)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if cfg.method == "full" else \
            sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        adapter = merged = None
        if cfg.method == "full":
            merged = work / "merged"
            model.save_pretrained(merged)
            tokenizer.save_pretrained(merged)
        else:
            adapter = work / "adapter"
            model.save_pretrained(adapter)
            del model
            if cfg.merge:
                merged = merge_adapter(base, adapter, work / "merged", tokenizer)
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size if adapter else None
        record = FinetuneResult(
            out=out,
            adapter=out / "adapter" if adapter else None,
            merged=out / "merged" if merged else None,
            train=result,
            train_rows=len(train_rows),
            val_rows=len(val_rows),
            data_sha256=data_digest(train_rows, val_rows),
            trainable_params=trainable,
            total_params=total,
            base_bytes=_weights_bytes(base),
            adapter_bytes=adapter_bytes,
        )
        (work / RESULT_FILE).write_text(json.dumps(_record_json(record, cfg, base), indent=2) + "\n",
                                        encoding="utf-8")
        for leftover in work.iterdir():
            if leftover.name not in ("adapter", "merged", RESULT_FILE):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if own_checkpoint:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return record


def _peft_finetune(base: Path, train_ex: list, val_ex: list, cfg: FinetuneConfig, checkpoint: Path, *,
                   pad_id: int, progress: bool) -> tuple[Any, TrainResult]:
    from trainer.loop import train

    model = load_model(base, cfg)
    if cfg.method != "full":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))
    result = train(model, train_ex, val_ex, cfg.train, pad_id=pad_id, checkpoint_dir=checkpoint,
                   progress=progress, label=f"{cfg.method} fine-tune")
    return model, result


def _record_json(record: FinetuneResult, cfg: FinetuneConfig, base: Path) -> dict[str, Any]:
    config = asdict(cfg)
    config["target_modules"] = cfg.target_modules if isinstance(cfg.target_modules, str) else \
        list(cfg.target_modules)
    return {
        "format": 1,
        "base": str(base),
        "config": config,
        "data": {"sha256": record.data_sha256, "train_rows": record.train_rows, "val_rows": record.val_rows},
        "params": {"trainable": record.trainable_params, "total": record.total_params},
        "bytes": {"base": record.base_bytes, "adapter": record.adapter_bytes},
        "result": dataclasses.asdict(record.train),
        "outputs": {"adapter": "adapter" if record.adapter else None, "merged": "merged" if record.merged else None},
    }


def read_result(out: Path | str) -> dict[str, Any]:
    """The finetune.json of a finished run."""
    return json.loads((Path(out) / RESULT_FILE).read_text(encoding="utf-8"))

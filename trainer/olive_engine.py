"""The olive engine of `trainer.finetune`: LoRA/QLoRA through `olive finetune` (olive-ai 0.13) in a subprocess.

Workflow of `olive_finetune(...)`:
1. write each training row as `{"text": <template-rendered prompt><answer><eos>}` into `work/olive-data.jsonl`
   (olive computes the loss on the whole text, not on the answer only as the peft engine does);
2. resolve "all-linear" to the names of the base's linear layers (olive's --target_modules takes names only),
   built on the meta device so nothing is loaded;
3. run `python -m olive finetune -m BASE -d json --data_files FILE --text_field text ...` with the same steps,
   batch, accumulation, learning rate, warmup, cosine schedule, clipping and seed as the peft engine, offline,
   telemetry off, in `work` (olive keeps its cache in the working folder); on failure keep its output in
   `<work>/../<name>.olive.log` and raise ConfigError with its last line;
4. read `olive/adapter` back into a PEFT model over the base and measure the val loss with `trainer.loop`, so both
   engines report the same measure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError
from trainer.dataset import Row, Template, end_text
from trainer.loop import TrainResult, evaluate_loss, lm_loss, pick_device, total_steps

TRAIN_LOSS_RE = re.compile(r"'train_loss': '([0-9]{1,6}(?:\.[0-9]{1,12})?)'")  # HF Trainer's closing summary
LOG_TAIL = 400  # characters of olive's last line in an error


def linear_module_names(base: Path) -> list[str]:
    """Short names of the base's linear layers, without the output head (what PEFT's "all-linear" picks)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def olive_command(base: Path, data: Path, out: Path, cfg: Any, steps: int, targets: list[str]) -> list[str]:
    """The `olive finetune` command line for `cfg` (a FinetuneConfig)."""
    import torch

    device, autocast = pick_device(cfg.train.device)
    t = cfg.train
    cmd = [sys.executable, "-m", "olive", "finetune", "-m", str(base), "-o", str(out), "--method", cfg.method,
           "--lora_r", str(cfg.rank), "--lora_alpha", str(cfg.alpha), "--target_modules", ",".join(targets),
           "--torch_dtype", "bfloat16" if autocast == torch.bfloat16 else "float32",
           "-d", "json", "--data_files", str(data), "--train_split", "train", "--text_field", "text",
           "--max_seq_len", str(t.max_tokens), "--log_level", "1", "--disable_telemetry"]
    cmd += ["--max_steps", str(steps), "--per_device_train_batch_size", str(t.batch_size),
            "--gradient_accumulation_steps", str(t.grad_accum), "--learning_rate", str(t.lr),
            "--warmup_ratio", str(t.warmup), "--weight_decay", str(t.weight_decay), "--lr_scheduler_type", "cosine",
            "--max_grad_norm", "1.0", "--seed", str(t.seed), "--logging_steps", str(max(1, steps // 10)),
            "--save_strategy", "no", "--report_to", "none"]
    if device.type == "cpu":
        cmd += ["--use_cpu", "true"]
    return cmd


def olive_finetune(base: Path, train_rows: list[Row], train_ex: list, val_ex: list, cfg: Any, work: Path, *,
                   tokenizer: Any, pad_id: int) -> tuple[Any, TrainResult]:
    """Train a LoRA adapter with olive in `work`; the PEFT model over the base and a TrainResult."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    template = Template(cfg.template)
    data = work / "olive-data.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for row in train_rows:
            text = template.render(tokenizer, row) + (row.answer or "") + end_text(tokenizer)
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    targets = linear_module_names(base) if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    steps = total_steps(cfg.train, len(train_ex))
    olive_out = work / "olive"
    cmd = olive_command(base, data, olive_out, cfg, steps, targets)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OLIVE_DISABLE_TELEMETRY": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    seconds = time.perf_counter() - started
    adapter = olive_out / "adapter"
    if done.returncode != 0 or not (adapter / "adapter_config.json").is_file():
        log = work.parent / f"{work.name.split('.partial-')[0].lstrip('.')}.olive.log"
        log.write_text(done.stdout, encoding="utf-8")
        last = (done.stdout.strip().splitlines() or ["no output"])[-1][-LOG_TAIL:]
        raise ConfigError(f"olive finetune failed (exit {done.returncode}): {last} (full log: {log})")

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    device, autocast = pick_device(cfg.train.device)
    model.to(device)
    val_loss = evaluate_loss(model, [_ex(e) for e in val_ex], batch_size=cfg.train.batch_size, pad_id=pad_id,
                             loss_fn=lm_loss, device=device, autocast=autocast) if val_ex else None
    model.to("cpu")
    found = TRAIN_LOSS_RE.findall(done.stdout)
    tokens = steps * cfg.train.batch_size * cfg.train.grad_accum * sum(len(e[0]) for e in train_ex) / len(train_ex)
    history = [{"step": steps, "epoch": None, "lr": None, "train_loss": float(found[-1]) if found else None,
                "val_loss": val_loss, "seconds": round(seconds, 3)}]
    result = TrainResult(steps=steps, epochs=steps * cfg.train.grad_accum * cfg.train.batch_size / len(train_ex),
                         train_loss=float(found[-1]) if found else float("nan"), val_loss=val_loss,
                         best_step=steps if val_loss is not None else None, stopped_early=False, seconds=seconds,
                         tokens_per_s=tokens / seconds if seconds > 0 else 0.0, history=history)
    for p in model.parameters():  # count what trained: the adapter's weights
        p.requires_grad_(False)
    return model, result


def _ex(e: tuple[list[int], int]) -> Any:
    from trainer.loop import Example

    return Example(list(e[0]), e[1])

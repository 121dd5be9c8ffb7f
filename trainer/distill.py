"""Distillation stage 2: a small student is fine-tuned on what a teacher answered (stage 1, `trainer.teacher`).

Workflow of `distill(student, teacher, prompts, out, cfg)`:
1. check everything before any work: `out` absent or empty, the student a local HF folder, the prompts readable
   (a JSONL file through `trainer.dataset.load_rows`, answers not needed), and for `mode="logits"` a local
   `HFTeacher` whose tokenizer is the student's (same tokenizer.json bytes, else the same vocabulary);
2. stage 1: `answer_prompts` answers each prompt `samples` times into the cache (`<out>.teacher.jsonl` unless given),
   resuming a run that was cut short;
3. stage 2: the answered rows are split into train/val by prompt (`split_rows`), encoded with the template (loss on
   the answer tokens), and the student is trained by `trainer.loop.train`, fully or through a LoRA adapter (PEFT),
   loaded, wrapped and merged by trainer.finetune's helpers (so a distilled and a fine-tuned student match).
   "text" mode trains on the teacher's text (cross-entropy); "logits" mode adds soft labels: the teacher runs (eval,
   no grad) on the student's own training sequences inside the loss, and the loss is
   alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * cross-entropy, on answer tokens only;
4. the result is built in a hidden sibling (`.<out>.distill/`, which also holds the resumable training checkpoint)
   and renamed into place: `out/merged/` (the student HF folder, ready for `trainer.export`), `out/adapter/` (LoRA
   only), `out/synthetic.jsonl` (the rows trained on) and `out/distill.json` (config, cache digest, results).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from protocol.errors import ConfigError
from trainer.dataset import Row, Template, encode, load_rows, split_rows, write_rows
from trainer.finetune import FinetuneConfig, load_model, load_tokenizer, lora_config, merge_adapter
from trainer.loop import TrainConfig, TrainResult, pick_device, train
from trainer.teacher import HFTeacher, Teacher, answer_prompts, check_model_folder

RESULT_FILE = "distill.json"
SYNTHETIC_FILE = "synthetic.jsonl"


@dataclass(frozen=True)
class DistillConfig:
    """How to distil: stage 1 sampling, stage 2 mode, method and training settings."""

    mode: Literal["text", "logits"] = "text"
    method: Literal["full", "lora"] = "lora"
    kd_temperature: float = 2.0  # T of the soft labels (logits mode)
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the cross-entropy on the teacher's text
    samples: int = 1  # teacher answers per prompt
    temperature: float = 0.0  # teacher sampling temperature (0: greedy)
    max_new_tokens: int = 128  # teacher answer budget in tokens
    label_regex: str | None = None  # reads a label from each answer, e.g. r"(ok|warning|fault):"
    template: str = "chat"  # trainer.dataset.Template text
    val: float = 0.1  # share of prompts held out for validation
    rank: int = 16  # LoRA rank
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        if self.mode not in ("text", "logits") or self.method not in ("full", "lora"):
            raise ConfigError(f"mode must be text or logits and method full or lora, not {self.mode}/{self.method}")
        if self.kd_temperature <= 0 or not 0 <= self.alpha <= 1 or not 0 <= self.val < 1:
            raise ConfigError("kd_temperature must be > 0, alpha in [0, 1] and val in [0, 1)")
        finetune_config(self)  # LoRA shape, target modules, template and training settings


@dataclass(frozen=True)
class DistillResult:
    """Where the student went, what stage 1 did and what training gave."""

    out: Path
    merged: Path
    adapter: Path | None
    rows: int
    cached: int
    answered: int
    run: str
    train: TrainResult
    seconds: float


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two model folders share a tokenizer: the same tokenizer.json bytes, else the same vocabulary."""
    ja, jb = a / "tokenizer.json", b / "tokenizer.json"
    if ja.is_file() and jb.is_file() and ja.read_bytes() == jb.read_bytes():
        return True
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(a).get_vocab() == AutoTokenizer.from_pretrained(b).get_vocab()


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} exists and is not an empty folder; pass a new --out")


def kd_loss(teacher: Any, *, temperature: float, alpha: float, vocab: int) -> Any:
    """A loop.LossFn: alpha * KL(teacher || student) at `temperature` (times T^2) + (1 - alpha) * cross-entropy,
    over the answer tokens (labels != -100), both models' logits cut to the shared `vocab`."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        target = labels[:, 1:]
        keep = target != -100
        student = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab][keep].float()
        if not keep.any():
            return student.sum() * 0.0
        if next(teacher.parameters()).device != ids.device:
            teacher.to(ids.device)
        with torch.no_grad():
            soft = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab][keep].float()
        ce = F.cross_entropy(student, target[keep])
        kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(soft / temperature, -1),
                      log_target=True, reduction="batchmean") * temperature**2
        return alpha * kl + (1 - alpha) * ce

    return loss_fn


def finetune_config(cfg: DistillConfig) -> FinetuneConfig:
    """The fine-tune settings of stage 2, for trainer.finetune's model loading, LoRA and merge helpers."""
    return FinetuneConfig(method=cfg.method, rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules, template=cfg.template, train=cfg.train)


def _student(path: Path, cfg: DistillConfig) -> tuple[Any, Any, int]:
    """The student as trainer.finetune loads it (wrapped in LoRA for method "lora"), its tokenizer and pad id."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the rich bars of stage 1 and of the training loop are the only ones
    torch.manual_seed(cfg.train.seed)
    tokenizer, pad_id = load_tokenizer(path)
    model = load_model(path, finetune_config(cfg))
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(finetune_config(cfg)))
    return model, tokenizer, pad_id


def _save(model: Any, tokenizer: Any, student: Path, work: Path, method: str) -> None:
    if method == "lora":
        model.save_pretrained(work / "adapter")
        merge_adapter(student, work / "adapter", work / "merged", tokenizer)
    else:
        model.save_pretrained(work / "merged")
        tokenizer.save_pretrained(work / "merged")


def rows_digest(rows: Sequence[Row]) -> str:
    """sha256 of the rows as written to synthetic.jsonl."""
    text = "".join(json.dumps(r.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n" for r in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def distill(student: Path | str, teacher: Teacher, prompts: Path | str | Sequence[Row], out: Path | str,
            cfg: DistillConfig | None = None, *, cache: Path | str | None = None,
            progress: bool = True) -> DistillResult:
    """Answer the prompts with the teacher (cached, resumable), then fine-tune the student on the answers."""
    start = time.perf_counter()
    cfg = cfg or DistillConfig()
    cfg.check()
    out = Path(out)
    _check_out(out)
    student = check_model_folder(student, "student")
    pick_device(cfg.train.device)  # no CUDA when --device cuda: refused now, not after stage 1
    rows = load_rows(prompts, need_answer=False) if isinstance(prompts, (str, Path)) else list(prompts)
    if not rows:
        raise ConfigError("no prompts to distil on")
    rows = [Row(r.messages, None) for r in rows]
    teacher_model = None
    if cfg.mode == "logits":
        if not isinstance(teacher, HFTeacher):
            raise ConfigError("logits distillation needs a local Hugging Face teacher folder (--teacher), not an "
                              "endpoint; use --mode text with --teacher-url")
        if not same_tokenizer(teacher.path, student):
            raise ConfigError(f"logits distillation needs teacher and student to share a tokenizer, and "
                              f"{teacher.path.name} and {student.name} do not; use --mode text")
    cache = Path(cache) if cache is not None else out.with_name(out.name + ".teacher.jsonl")
    stage1 = answer_prompts(rows, teacher, cache, samples=cfg.samples, temperature=cfg.temperature,
                            max_new_tokens=cfg.max_new_tokens, label_regex=cfg.label_regex, progress=progress)

    if cfg.mode == "text" and isinstance(teacher, HFTeacher):
        teacher.unload()  # its memory goes to the student
    model, tokenizer, pad_id = _student(student, cfg)
    template = Template(cfg.template)
    splits = split_rows(stage1.rows, val=cfg.val, test=0.0, seed=cfg.train.seed)
    if not splits["train"]:
        splits = {"train": stage1.rows, "val": []}
    examples = {k: [encode(tokenizer, r, template, cfg.train.max_tokens) for r in splits[k]] for k in ("train", "val")}
    loss_fn = None
    if cfg.mode == "logits":
        teacher_model, _ = teacher.load()
        loss_fn = kd_loss(teacher_model, temperature=cfg.kd_temperature, alpha=cfg.alpha, vocab=len(tokenizer))
    work = out.with_name(f".{out.name}.distill")
    work.mkdir(parents=True, exist_ok=True)
    result = train(model, examples["train"], examples["val"], cfg.train, pad_id=pad_id, loss_fn=loss_fn,
                   checkpoint_dir=work / "checkpoint", progress=progress, label=f"distill {cfg.mode}")
    staging = work / "out"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _save(model, tokenizer, student, staging, cfg.method)
    write_rows(staging / SYNTHETIC_FILE, stage1.rows)
    seconds = time.perf_counter() - start
    summary = {
        "student": student.name, "teacher": teacher.name, "teacher_identity": teacher.identity,
        "config": _jsonable(asdict(cfg)),
        "cache": {"file": cache.name, "run": stage1.run, "rows_sha256": rows_digest(stage1.rows)},
        "stage1": {"prompts": len(rows), "rows": len(stage1.rows), "cached": stage1.cached,
                   "answered": stage1.answered, "labelled": sum(r.label is not None for r in stage1.rows)},
        "split": {"train": len(examples["train"]), "val": len(examples["val"])},
        "train": _jsonable(asdict(result)), "seconds": round(seconds, 3),
    }
    (staging / RESULT_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():
        out.rmdir()  # checked empty above
    staging.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return DistillResult(out, out / "merged", out / "adapter" if cfg.method == "lora" else None, len(stage1.rows),
                         stage1.cached, stage1.answered, stage1.run, result, seconds)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def make_teacher(*, path: Path | str | None = None, url: str | None = None, model: str | None = None,
                 api_key: str | None = None, template: str = "chat", top_p: float = 1.0,
                 device: str = "auto") -> Teacher:
    """A teacher from command-line style arguments: a local folder, or an OpenAI-compatible URL and model name."""
    from trainer.teacher import OpenAITeacher

    if (path is None) == (url is None) or (url is not None and not model):
        raise ConfigError("pass either a teacher folder or a teacher URL with a model name")
    if path is not None:
        return HFTeacher(path, template=Template(template), top_p=top_p, device=device)
    return OpenAITeacher(str(url), str(model), api_key=api_key)


def run_distill(student: Path | str, prompts: Path | str, out: Path | str, cfg: DistillConfig, *,
                teacher: Path | str | None = None, teacher_url: str | None = None, teacher_model: str | None = None,
                api_key: str | None = None, top_p: float = 1.0, device: str = "auto",
                cache: Path | str | None = None, progress: bool = True) -> DistillResult:
    """`distill` with the teacher named the command line's way (what `slmops train distill` runs)."""
    cfg.check()
    _check_out(Path(out))
    chosen = make_teacher(path=teacher, url=teacher_url, model=teacher_model, api_key=api_key,
                          template=cfg.template, top_p=top_p, device=device)
    return distill(student, chosen, prompts, out, cfg, cache=cache, progress=progress)

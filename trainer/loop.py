"""One training loop for every trainer command: AdamW, warmup then cosine, evaluation, early stopping, resumable.

Workflow of `train(model, train, val, cfg, pad_id=...)`:
1. pick the device (`auto`: cuda when present, with bf16 autocast where the GPU supports it; cpu with `cfg.threads`
   intra-op threads), seed torch and python from `cfg.seed`, and cut every example to `cfg.max_tokens`;
2. the step count is `cfg.max_steps`, or `cfg.epochs` passes over `train` in micro-batches of `cfg.batch_size`,
   `cfg.grad_accum` micro-batches per optimizer step; each epoch's order is a permutation drawn from a generator
   seeded by (seed, epoch), so the batches of step k never depend on what ran before it;
3. each step: loss (`loss_fn`, the answer-token causal-LM loss by default) of each micro-batch, backward, gradients
   clipped to norm 1.0, AdamW step over the trainable parameters, learning rate step;
4. before the first step (when `val` is given), every `cfg.eval_every` steps and at the end: the validation loss (weighted by answer tokens), one `history`
   row, the best weights kept when it improved, and a checkpoint (step, optimizer, learning-rate schedule, torch
   and python RNG, trainable weights, best weights and loss, history) written atomically into `checkpoint_dir`;
   after `cfg.patience` evaluations without improvement the run stops early;
5. at the end the best weights (by validation loss) are put back when `val` was given.

A rerun with the same `checkpoint_dir`, config and examples continues from the last checkpoint and ends with the
same weights as a run that was never interrupted (on CPU with `threads=1`); a checkpoint written for another
config or other examples is refused.

Examples are `(ids, answer_start)` tuples as `trainer.dataset.encode` returns them, or any object with `.ids`,
`.start` and optionally `.extra` (such as `Example`). `extra` maps a name to a tensor (or a nested list of numbers)
per example; a batch stacks each extra under its own name beside `input_ids`, `attention_mask` and `labels`, right-
padding with zeros along the first dimension to the longest in the batch when lengths differ (so a per-token extra
of length len(ids) lines up with the padded ids). An extra whose first dimension is len(ids) is cut with the ids.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import ConfigError
from trainer.dataset import collate

if TYPE_CHECKING:
    import torch

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_FORMAT = 1
CLIP_NORM = 1.0
RESERVED = ("input_ids", "attention_mask", "labels")  # batch keys an extra may not take
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    max_steps: int | None = None  # optimizer steps; None: `epochs` decides
    epochs: float = 1.0  # passes over the training examples when max_steps is None
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate
    warmup: float = 0.05  # share of the steps spent warming up linearly
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_tokens: int = 512  # tokens: an example is cut to this
    eval_every: int = 50  # steps between evaluations; 0: only at the end
    patience: int = 0  # evaluations without a better val loss before stopping; 0: never stop early
    seed: int = 0  # data order, dropout and initialisation
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int | None = 1  # CPU intra-op threads while training (1: same weights on any machine); None: as is

    def __post_init__(self) -> None:
        checks = [
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be at least 1, not {self.max_steps}"),
            (self.epochs > 0 and math.isfinite(self.epochs), f"epochs must be above 0, not {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, not {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be at least 1, not {self.grad_accum}"),
            (0 <= self.lr < 1, f"lr must be in [0, 1), not {self.lr}"),
            (0 <= self.warmup < 1, f"warmup must be a share in [0, 1), not {self.warmup}"),
            (0 <= self.weight_decay < 1, f"weight_decay must be in [0, 1), not {self.weight_decay}"),
            (self.max_tokens >= 2, f"max_tokens must be at least 2, not {self.max_tokens}"),
            (self.eval_every >= 0, f"eval_every must be 0 or more, not {self.eval_every}"),
            (self.patience >= 0, f"patience must be 0 or more, not {self.patience}"),
            (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, not {self.device!r}"),
            (self.threads is None or self.threads >= 1, f"threads must be at least 1, not {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class TrainResult:
    """What a run did: steps, epochs, losses, when it was best, whether it stopped early, its speed, its evals."""

    steps: int  # optimizer steps taken
    epochs: float  # passes over the training examples
    train_loss: float  # mean training loss since the evaluation before the last one
    val_loss: float | None  # best validation loss (the weights left in the model); None without val examples
    best_step: int | None  # step of the best validation loss
    stopped_early: bool
    seconds: float  # training time, summed over resumed runs
    tokens_per_s: float  # trained tokens (attention mask) per second
    history: list[dict[str, Any]]  # one row per evaluation: step, epoch, lr, train_loss, val_loss, seconds


@dataclass(frozen=True)
class Example:
    """A training example with per-example extras for a custom loss (e.g. a teacher's logits)."""

    ids: list[int]
    start: int  # index of the first answer token
    extra: dict[str, Any] = field(default_factory=dict)


LossFn = Callable[["torch.nn.Module", dict[str, "torch.Tensor"]], "torch.Tensor"]


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Causal-LM cross-entropy on the answer tokens (labels != -100), averaged over those tokens."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total / labels.ne(-100).sum().clamp(min=1)


def _as_example(item: Any, max_tokens: int) -> Example:
    if isinstance(item, tuple) and len(item) == 2:
        ids, start, extra = item[0], item[1], {}
    elif hasattr(item, "ids") and hasattr(item, "start"):
        ids, start, extra = item.ids, item.start, dict(getattr(item, "extra", None) or {})
    else:
        raise ConfigError(f"a training example is (ids, start) or has .ids and .start, not {type(item).__name__}")
    ids = list(ids)
    if not ids or not 0 <= int(start) <= len(ids):
        raise ConfigError(f"an example needs ids and 0 <= start <= len(ids), not start={start} of {len(ids)}")
    clash = [k for k in extra if k in RESERVED]
    if clash:
        raise ConfigError(f"extra field {clash[0]!r} clashes with a batch key; rename it")
    cut = {k: (v[:max_tokens] if _first_dim(v) == len(ids) else v) for k, v in extra.items()}
    return Example(ids[:max_tokens], min(int(start), max_tokens), cut)


def _first_dim(value: Any) -> int | None:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else None
    return len(value) if isinstance(value, (list, tuple)) else None


def make_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels (trainer.dataset.collate) and each extra stacked under its name."""
    import torch

    ids, mask, labels = collate([(e.ids, e.start) for e in examples], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for name in examples[0].extra:
        try:
            values = [torch.as_tensor(e.extra[name]) for e in examples]
        except KeyError as exc:
            raise ConfigError(f"extra field {name!r} is missing from some examples of a batch") from exc
        if len({v.shape for v in values}) > 1:
            width = max(int(v.shape[0]) for v in values)
            values = [torch.nn.functional.pad(v, (0, 0) * (v.dim() - 1) + (0, width - v.shape[0])) for v in values]
        batch[name] = torch.stack(values)
    return batch


def pick_device(name: str) -> tuple[torch.device, torch.dtype | None]:
    """The device to train on and the autocast dtype (bf16 on a CUDA device that supports it, else None)."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda"), (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    return torch.device("cpu"), None


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimizer steps of a run: max_steps, or enough micro-batches for `epochs` passes."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(n_train / cfg.batch_size)
    return max(1, math.ceil(math.ceil(cfg.epochs * per_epoch) / cfg.grad_accum))


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over `warmup` of the steps, then cosine down to 0 at the last step."""
    warm = int(steps * warmup)
    if step < warm:
        return (step + 1) / (warm + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


class _Order:
    """Micro-batch m of the run: epoch m // per_epoch, drawn from that epoch's seeded permutation."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._epoch, self._perm = -1, []

    def batch(self, m: int) -> list[int]:
        import torch

        epoch, chunk = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).tolist()
        return self._perm[chunk * self.batch_size : (chunk + 1) * self.batch_size]


def _digest(cfg: TrainConfig, train: Sequence[Example], val: Sequence[Example], names: list[str]) -> str:
    """What a checkpoint was written for: config (less device and threads), examples and trainable names."""
    digest = hashlib.sha256(repr({k: v for k, v in asdict(cfg).items() if k not in ("device", "threads")}).encode())
    for part in (train, val):
        for e in part:
            digest.update(f"{e.ids}|{e.start}|{sorted(e.extra)};".encode())
        digest.update(b"#")
    digest.update(repr(names).encode())
    return digest.hexdigest()


def _snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}


def _restore(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    import torch

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))


def _save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{CHECKPOINT_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT_FILE)


def _load_checkpoint(folder: Path, digest: str) -> dict[str, Any] | None:
    import torch

    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged file: torch raises many kinds
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}); remove it to start over") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("digest") != digest:
        raise ConfigError(f"checkpoint {path} was written for another config or other data; remove it to start over")
    return state


def evaluate_loss(model: torch.nn.Module, examples: Sequence[Example], *, batch_size: int, pad_id: int,
                  loss_fn: LossFn, device: torch.device, autocast: torch.dtype | None) -> float:
    """Mean loss over `examples` in order, each batch weighted by its answer tokens (by its size when it has none)."""
    import torch

    was_training = model.training
    model.eval()
    total = weight = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in make_batch(examples[i : i + batch_size], pad_id).items()}
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = float(loss_fn(model, batch))
            w = float(batch["labels"].ne(-100).sum()) or float(len(batch["labels"]))
            total, weight = total + loss * w, weight + w
    model.train(was_training)
    return total / weight


def _trainable(model: torch.nn.Module, trainable: Iterable[torch.nn.Parameter] | None) -> dict[str, Any]:
    """Name -> parameter of what trains: `trainable` (the rest frozen), or what already requires grad."""
    if trainable is not None:
        chosen = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameters")
    return params


@dataclass
class _Progress:
    """What a checkpoint carries besides tensors and what the result reports."""

    step: int = 0
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    stopped_early: bool = False
    done: bool = False


class _Trainer:
    """One run's state: model, trainable parameters, optimizer, schedule, order, best weights, progress."""

    def __init__(self, model: torch.nn.Module, params: dict[str, Any], train: list[Example], val: list[Example],
                 cfg: TrainConfig, *, pad_id: int, loss_fn: LossFn) -> None:
        import torch

        self.model, self.params, self.train, self.val, self.cfg = model, params, train, val, cfg
        self.pad_id, self.loss_fn = pad_id, loss_fn
        self.device, self.autocast = pick_device(cfg.device)
        if next(model.parameters()).device.type != self.device.type:  # a quantized model is placed by its loader
            model.to(self.device)
        self.steps = total_steps(cfg, len(train))
        self.optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                          lambda s: lr_factor(s, self.steps, cfg.warmup))
        self.order = _Order(len(train), cfg.batch_size, cfg.seed)
        self.digest = _digest(cfg, train, val, list(params))
        self.best: dict[str, torch.Tensor] | None = None
        self.run = _Progress()

    def resume_or_seed(self, checkpoint_dir: Path | None) -> None:
        """Load the checkpoint in `checkpoint_dir` when there is one, else seed torch and python."""
        import torch

        state = _load_checkpoint(checkpoint_dir, self.digest) if checkpoint_dir is not None else None
        if state is None:
            torch.manual_seed(self.cfg.seed)
            random.seed(self.cfg.seed)
            return
        _restore(self.params, state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        self.best, self.run = state["best"], _Progress(**state["run"])

    def state(self) -> dict[str, Any]:
        """Everything a rerun needs to continue exactly where this one is."""
        import torch

        return {
            "format": CHECKPOINT_FORMAT,
            "digest": self.digest,
            "weights": _snapshot(self.params),
            "best": self.best,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
            "run": asdict(self.run),
        }

    def step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns its loss."""
        import torch

        cfg, step = self.cfg, self.run.step
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
            batch = make_batch([self.train[i] for i in self.order.batch(m)], self.pad_id)
            self.run.tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                loss = self.loss_fn(self.model, batch) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), CLIP_NORM)
        self.optimizer.step()
        self.schedule.step()
        self.run.step = step + 1
        return total

    def evaluate(self, window: list[float]) -> None:
        """Validation loss, best weights, evaluations without improvement, one history row."""
        run, val_loss = self.run, None
        if self.val:
            val_loss = evaluate_loss(self.model, self.val, batch_size=self.cfg.batch_size, pad_id=self.pad_id,
                                     loss_fn=self.loss_fn, device=self.device, autocast=self.autocast)
            if run.best_loss is None or val_loss < run.best_loss:
                run.best_loss, run.best_step, run.bad_evals = val_loss, run.step, 0
                self.best = _snapshot(self.params)
            else:
                run.bad_evals += 1
        run.history.append({
            "step": run.step,
            "epoch": round(self.epochs(), 4),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": sum(window) / len(window) if window else None,
            "val_loss": val_loss,
            "seconds": round(run.seconds, 3),
        })

    def epochs(self) -> float:
        return self.run.step * self.cfg.grad_accum / self.order.per_epoch

    def loop(self, checkpoint_dir: Path | None, *, progress: bool, label: str) -> None:
        """Steps to the end or an early stop, evaluating and checkpointing every `eval_every` steps."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cfg, run = self.cfg, self.run
        if run.done:
            return
        if run.step == 0 and not run.history and self.val:  # the starting point, for early stopping and reports
            self.evaluate([])
        self.model.train()
        window: list[float] = []
        counter = TextColumn("{task.completed}/{task.total} loss {task.fields[loss]} val {task.fields[val]}")
        columns = (TextColumn(label), BarColumn(), counter, TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(label, total=self.steps, completed=run.step, loss="-", val="-")
            while not run.done:
                started = time.perf_counter()
                window.append(self.step())
                run.seconds += time.perf_counter() - started
                bar.update(task, completed=run.step, loss=f"{window[-1]:.3f}")
                at_end = run.step >= self.steps
                if not (at_end or (cfg.eval_every and run.step % cfg.eval_every == 0)):
                    continue
                self.evaluate(window)
                window = []
                run.stopped_early = not at_end and cfg.patience > 0 and run.bad_evals >= cfg.patience
                run.done = at_end or run.stopped_early
                if run.history[-1]["val_loss"] is not None:
                    bar.update(task, val=f"{run.history[-1]['val_loss']:.3f}")
                if checkpoint_dir is not None:
                    _save_checkpoint(checkpoint_dir, self.state())

    def result(self) -> TrainResult:
        run = self.run
        losses = [h["train_loss"] for h in run.history if h["train_loss"] is not None]
        return TrainResult(
            steps=run.step,
            epochs=self.epochs(),
            train_loss=losses[-1] if losses else float("nan"),
            val_loss=run.best_loss,
            best_step=run.best_step,
            stopped_early=run.stopped_early,
            seconds=run.seconds,
            tokens_per_s=run.tokens / run.seconds if run.seconds > 0 else 0.0,
            history=list(run.history),
        )


def train(
    model: torch.nn.Module,
    train: Sequence[Any],
    val: Sequence[Any],
    cfg: TrainConfig,
    *,
    pad_id: int,
    loss_fn: LossFn | None = None,
    checkpoint_dir: Path | None = None,
    trainable: Iterable[torch.nn.Parameter] | None = None,
    progress: bool = True,
    label: str = "train",
) -> TrainResult:
    """Train `model` in place on `train`, evaluating on `val`; the best weights (by val loss) are left in it."""
    import torch

    train_ex = [_as_example(e, cfg.max_tokens) for e in train]
    val_ex = [_as_example(e, cfg.max_tokens) for e in val]
    if not train_ex:
        raise ConfigError("there are no training examples")
    trainer = _Trainer(model, _trainable(model, trainable), train_ex, val_ex, cfg, pad_id=pad_id,
                       loss_fn=loss_fn or lm_loss)
    trainer.resume_or_seed(Path(checkpoint_dir) if checkpoint_dir is not None else None)
    threads = torch.get_num_threads()
    if trainer.device.type == "cpu" and cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        trainer.loop(Path(checkpoint_dir) if checkpoint_dir is not None else None, progress=progress, label=label)
    finally:
        torch.set_num_threads(threads)
    if trainer.best is not None:
        _restore(trainer.params, trainer.best)
    model.eval()
    return trainer.result()

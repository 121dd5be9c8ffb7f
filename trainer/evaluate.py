"""Evaluate a model on a task (the shipped triage task, or a user's own JSONL) and write the bundle's `eval.json`.

Workflow: `load_task()` reads the rows to score (by default the reference task's test split; else a user's JSONL
through `trainer.dataset.load_rows`, either a whole test file or the `test` part of `split_rows` of one file, so the
rows scored are never rows the model trained on) and the `Scorer`: the rule that reads a label out of an answer
(`protocol.manifest.RegexMatch`, first group = label, or "exact"), the very rule object the device scores its
held-out set with (`protocol.evalset.is_right`), so the device's score means what the trainer's metric means.
`evaluate_task(model, rows)` opens an onnxruntime-genai folder or a Hugging Face folder (`trainer.eval_backends`),
in a fresh process by default so its peak memory is its own, decodes every row greedily and returns an
`EvalReport`: task metrics (`label_accuracy` when rows carry labels, `format_rate` when the rule is a regex,
`exact_match`), cost metrics (`perplexity` of the reference answers over the first `perplexity_rows` rows,
`ttft_ms_mean`/`ttft_ms_p50`, `tokens_per_s` (new tokens over whole answer time), `decode_tokens_per_s` (after the
first token), `latency_ms_mean`, `peak_rss_mb`, `bytes_on_disk`) and `samples`. `compare()` does that for several
models on the same rows.

`write_eval()` stores the metrics in `eval.json` next to an exported model with two smoke prompts the device's
health check sends after an install, and writes a small held-out set (`eval/heldout.jsonl`: for the reference task
the first `HELDOUT_PER_LABEL` rows of each label of the test split; for a user's task up to `HELDOUT_PER_LABEL`
held-out rows of each label, or the first `HELDOUT_UNLABELLED` rows scored "exact" on the whole answer when the
rows carry no labels) into the model folder, named under `heldout` in `eval.json`. The bundle builder reads that
file for the manifest's eval metrics, health-check prompts and held-out set (which it packs like any other file).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from protocol.errors import ConfigError, clip
from protocol.evalset import MAX_CONTENT_CHARS, MAX_EXPECTED_CHARS, MAX_ITEMS, EvalItem, is_right, label_of, parse_items
from protocol.manifest import (
    MAX_EVAL_NEW_TOKENS, MAX_EVAL_SET_BYTES, HeldoutSet, MatchRule, RegexMatch, first_error,
)
from trainer.dataset import Row, Template, load_rows, reference_rows, split_rows, write_rows
from trainer.eval_backends import Generation, backend_of
from trainer.task import ANSWER_RE, DATASET, LABELS, load_split

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    import onnxruntime_genai as og

    from trainer.eval_backends import Runner

__all__ = ["Generation", "EvalReport", "EvalTask", "Scorer", "compare", "evaluate", "evaluate_task", "load_task",
           "write_eval"]

EVAL_FILE = "eval.json"
SMOKE_EXPECT = r"^(ok|warning|fault):"
LOOSE_EXPECT = r"\S"  # a user's task without a label regex: the health check wants any non-blank answer
MAX_NEW_TOKENS = 32
PERPLEXITY_ROWS = 50  # rows whose reference answers the perplexity is measured on
HELDOUT_FILE = "eval/heldout.jsonl"  # inside the model folder, so the bundle carries it and its hash
HELDOUT_PER_LABEL = 10  # rows of each label in the held-out set (30 in all: about 4 kB, well under a second on a device)
HELDOUT_UNLABELLED = 30  # rows in the held-out set of a task without labels
HELDOUT_METRIC = "label_accuracy"  # the device's score is the same measure as the trainer's metric of that name
HELDOUT_NEW_TOKENS = 16  # tokens: enough for the label and its colon
MATCH = RegexMatch(regex=ANSWER_RE.pattern)  # the answer's label is the group of `^(ok|warning|fault): `
STEM_RE = re.compile(r"[^A-Za-z0-9._-]+")  # what a dataset name keeps of a file's stem
DATASET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[a-z]{1,16}")  # eval.json's dataset: "<name>/<split>"
SPLITS = ("test", "val")


@dataclass(frozen=True)
class Scorer:
    """How an answer is scored: `match` reads its label ("exact": the whole answer; a RegexMatch: its first group)."""

    match: MatchRule = "exact"

    @classmethod
    def of(cls, label_regex: str | None = None, *, exact: bool = False, default: MatchRule = "exact") -> Scorer:
        """The scorer for a `--label-regex` or `--exact-label` choice (neither: `default`); ConfigError if the
        regex does not compile or is longer than the manifest allows."""
        if label_regex is not None and exact:
            raise ConfigError("give a label regex or exact label matching, not both")
        if exact:
            return cls("exact")
        if label_regex is None:
            return cls(default)
        try:
            return cls(RegexMatch(regex=label_regex))
        except ValidationError as exc:
            raise ConfigError(f"label regex {clip(label_regex)} is not usable: {first_error(exc)}; "
                              "give a regex of at most 256 chars whose first group is the label") from None

    @property
    def regex(self) -> str | None:
        return self.match.regex if isinstance(self.match, RegexMatch) else None

    def right(self, answer: str, label: str) -> bool:
        return is_right(answer, label, self.match)

    def formatted(self, answer: str) -> bool:
        """Whether the answer has the form the label regex reads (always, for "exact")."""
        return label_of(answer, self.match) is not None

    def to_json(self) -> Any:
        return self.match if isinstance(self.match, str) else self.match.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Any) -> Scorer:
        return cls("exact") if data == "exact" else cls(RegexMatch.model_validate(data))

    def check(self, rows: Sequence[Row], where: str = "the rows") -> None:
        """Refuse a rule that does not read the label out of the rows' own answers: it would score nonsense."""
        labelled = [r for r in rows if r.label is not None and r.answer is not None]
        misses = [r for r in labelled if not self.right(r.answer or "", r.label or "")]
        if misses:
            rule = "exact" if self.regex is None else f"regex {clip(self.regex)}"
            raise ConfigError(
                f"the label rule ({rule}) reads the label out of {len(labelled) - len(misses)} of {len(labelled)} "
                f"reference answers in {where} (e.g. label {clip(misses[0].label)} in answer {clip(misses[0].answer)})"
                "; pass a label regex whose first group captures the label, e.g. '^(\\w+):'")



@dataclass(frozen=True)
class EvalTask:
    """Rows to score (never training rows), their name in eval.json and the scorer."""

    dataset: str  # e.g. "slmops-triage-v1/test" or "<file stem>/test"
    rows: tuple[Row, ...]
    scorer: Scorer = Scorer()
    reference: bool = False  # the shipped triage task: eval.json's smoke prompts and held-out set as they always were

    @property
    def split(self) -> str:
        return self.dataset.rsplit("/", 1)[-1]


def load_task(path: Path | str | None = None, *, whole_file: bool = False, split: str = "test", val: float = 0.1,
              test: float = 0.1, seed: int = 0, label_regex: str | None = None, exact: bool = False) -> EvalTask:
    """The rows to evaluate on: the reference task's `split` (no path); every row of `path` (`whole_file`, a test
    file); or the `split` part of `split_rows(load_rows(path), val=, test=, seed=)` (the fractions and seed the
    model was trained with, so no training row is scored)."""
    if split not in SPLITS:
        raise ConfigError(f"evaluate on the 'test' or 'val' split, not {clip(split)}: never on training rows")
    if path is None:
        rows = reference_rows(split)
        scorer = Scorer.of(label_regex, exact=exact, default=MATCH)
        scorer.check(rows, f"the {DATASET} {split} split")
        return EvalTask(f"{DATASET}/{split}", tuple(rows), scorer, reference=label_regex is None and not exact)
    path = Path(path)
    scorer = Scorer.of(label_regex, exact=exact)
    rows = load_rows(path)
    stem = STEM_RE.sub("-", path.stem).strip("-.")[:64] or "task"
    if whole_file:
        chosen, split = rows, "test"
    else:
        chosen = split_rows(rows, val=val, test=test, seed=seed)[split]
        if not chosen:
            raise ConfigError(f"the {split} split of {path} is empty ({len(rows)} rows, val={val} test={test}); "
                              "give more rows, larger fractions, or a test file of its own")
    scorer.check(chosen, str(path))
    return EvalTask(f"{stem}/{split}", tuple(chosen), scorer)


@dataclass(frozen=True)
class EvalReport:
    """One model's figures on one task; every metric a finite float named like `protocol.manifest.METRIC_RE`."""

    model: str
    backend: str  # "onnx" | "hf"
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "backend": self.backend, "metrics": self.metrics}


def evaluate_task(model: Path | str, rows: Sequence[Row], *, template: Template | None = None,
                  scorer: Scorer | None = None, backend: str = "auto", max_new_tokens: int = MAX_NEW_TOKENS,
                  perplexity_rows: int = PERPLEXITY_ROWS, limit: int | None = None, device: str = "auto",
                  threads: int | None = None, isolate: bool = True, progress: bool = True) -> EvalReport:
    """Score `model` on `rows` (the first `limit`): greedy answers, perplexity of the reference answers, speed and
    cost. `isolate` runs it in a fresh process and adds `peak_rss_mb`; in this process that figure would carry
    whatever was loaded before, so it is left out."""
    template = template or Template()
    scorer = scorer or Scorer()
    kind = backend_of(model, backend)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1 row, not {clip(limit)}")
    if not 1 <= max_new_tokens <= 4096:
        raise ConfigError(f"max new tokens must be 1 to 4096, not {clip(max_new_tokens)}")
    if perplexity_rows < 0:
        raise ConfigError(f"perplexity rows must be 0 (none) or more, not {clip(perplexity_rows)}")
    rows = list(rows)[:limit]
    if not rows or any(r.answer is None for r in rows):
        raise ConfigError("evaluation needs rows with answers; load them with trainer.dataset.load_rows")
    scorer.check(rows)
    request = {"model": str(model), "backend": kind, "template": template.text, "scorer": scorer.to_json(),
               "max_new_tokens": max_new_tokens, "perplexity_rows": perplexity_rows, "device": device,
               "threads": threads, "progress": progress}
    if isolate:
        import tempfile

        from trainer.eval_backends import run_isolated

        with tempfile.TemporaryDirectory(prefix="slmops-eval-") as tmp:
            request["rows_file"] = str(write_rows(Path(tmp) / "rows.jsonl", rows))
            metrics = run_isolated(request, progress=progress)
    else:
        metrics = request_metrics(request, rows)
    metrics["bytes_on_disk"] = float(bytes_on_disk(model))
    return EvalReport(str(model), kind, {k: v for k, v in metrics.items() if math.isfinite(v)})


def compare(models: Sequence[Path | str], rows: Sequence[Row], **options: Any) -> list[EvalReport]:
    """`evaluate_task` for each model on the same rows with the same options (each in its own process)."""
    if not models:
        raise ConfigError("compare needs at least one model folder")
    for model in models:
        backend_of(model, options.get("backend", "auto"))  # refuse a bad folder before spending time on the others
    return [evaluate_task(m, rows, **options) for m in models]


def bytes_on_disk(model: Path | str) -> int:
    """Bytes of the model folder's files, leaving out what evaluation writes into it (eval.json, eval/)."""
    root = Path(model)
    skip = {root / EVAL_FILE, root / Path(HELDOUT_FILE).parts[0]}
    total = 0
    for path in root.rglob("*"):
        if path.is_file() and not any(path == s or s in path.parents for s in skip):
            total += path.stat().st_size
    return total


def request_metrics(request: dict[str, Any], rows: Sequence[Row] | None = None) -> dict[str, float]:
    """Open the request's model and score its rows (the evaluation process's work; see trainer.eval_backends)."""
    from trainer.eval_backends import open_runner

    rows = rows if rows is not None else load_rows(request["rows_file"])
    runner = open_runner(request["model"], request["backend"], request["device"], request["threads"])
    return score_rows(runner, rows, template=Template(request["template"]), scorer=Scorer.from_json(request["scorer"]),
                      max_new_tokens=request["max_new_tokens"], perplexity_rows=request["perplexity_rows"],
                      progress=request["progress"])


def score_rows(runner: Runner, rows: Sequence[Row], *, template: Template, scorer: Scorer, max_new_tokens: int,
               perplexity_rows: int, progress: bool) -> dict[str, float]:
    """Answer each row greedily and score it (after one untimed warm-up answer, so first-call set-up does not count
    as time to first token); then the reference answers' perplexity on the first `perplexity_rows` rows."""
    from rich.console import Console
    from rich.progress import Progress

    labels = formats = exact = tokens = decode_tokens = labelled = 0
    seconds = decode_seconds = nll = 0.0
    ttfts: list[float] = []
    counted = 0
    ppl_rows = list(rows)[:perplexity_rows]
    runner.answer(runner.render(rows[0], template), max_new_tokens)  # warm-up, untimed: first-call set-up
    with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task(f"evaluating ({runner.backend})", total=len(rows) + len(ppl_rows))
        for row in rows:
            out = runner.answer(runner.render(row, template), max_new_tokens)
            if row.label is not None:
                labelled += 1
                labels += scorer.right(out.text, row.label)
            formats += scorer.formatted(out.text)
            exact += is_right(out.text, row.answer or "", "exact")
            tokens += out.new_tokens
            seconds += out.seconds
            ttfts.append(out.ttft_s)
            decode_tokens += max(0, out.new_tokens - 1)
            decode_seconds += max(0.0, out.seconds - out.ttft_s)
            bar.advance(task)
        for row in ppl_rows:
            row_nll, n = runner.answer_nll(row, template)
            nll, counted = nll + row_nll, counted + n
            bar.advance(task)
    n = len(rows)
    metrics: dict[str, float] = {}
    if labelled:
        metrics["label_accuracy"] = labels / labelled
    if scorer.regex is not None:
        metrics["format_rate"] = formats / n
    metrics.update({
        "exact_match": exact / n,
        "latency_ms_mean": 1000 * seconds / n,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else 0.0,
        "ttft_ms_mean": 1000 * statistics.fmean(ttfts),
        "ttft_ms_p50": 1000 * statistics.median(ttfts),
        "samples": float(n),
    })
    if counted:
        metrics["perplexity"] = math.exp(min(nll / counted, 700.0))
        metrics["perplexity_rows"] = float(len(ppl_rows))
    return metrics


def load(onnx_dir: Path | str) -> tuple[og.Model, og.Tokenizer]:
    """Open an onnxruntime-genai model folder and its tokenizer."""
    import onnxruntime_genai as og

    folder = Path(onnx_dir)
    if not (folder / "genai_config.json").is_file():
        raise ConfigError(f"{folder} is not an onnxruntime-genai model folder (no genai_config.json)")
    model = og.Model(str(folder))
    return model, og.Tokenizer(model)


def chat_prompt(tokenizer: og.Tokenizer, content: str) -> str:
    """`content` as a single user turn in the model's chat template, ready for the assistant's answer."""
    messages = json.dumps([{"role": "user", "content": content}])
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except RuntimeError:  # the model ships no chat template: send the text as it is
        return content


def generate(model: og.Model, tokenizer: og.Tokenizer, text: str, max_new_tokens: int = MAX_NEW_TOKENS) -> Generation:
    """Greedy answer to an already formatted prompt, without its end-of-turn token."""
    import onnxruntime_genai as og

    start = time.perf_counter()
    ids = tokenizer.encode(text)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    stop = set(tokenizer.eos_token_ids)
    new: list[int] = []
    ttft = None
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        ttft = time.perf_counter() - start if ttft is None else ttft
        if token in stop:
            break
        new.append(token)
    answer = tokenizer.decode(new)
    return Generation(text=answer.strip(), new_tokens=len(new), seconds=time.perf_counter() - start,
                      ttft_s=ttft or 0.0)


def evaluate(onnx_dir: Path | str, split: str = "test", limit: int | None = None) -> dict[str, float]:
    """The reference task's `split` scored on an exported model (see `evaluate_task`); every metric is a float."""
    backend_of(onnx_dir, "onnx")
    task = load_task(split=split)
    return evaluate_task(onnx_dir, task.rows, scorer=task.scorer, backend="onnx", limit=limit, progress=False).metrics


def smoke_prompts(split: str = "test") -> list[dict[str, str]]:
    """Two health-check prompts: the first fault and the first ok line of the split."""
    rows = load_split(split)
    picks = [next(r for r in rows if r["label"] == label) for label in ("fault", "ok")]
    return [{"prompt": r["prompt"], "expect": SMOKE_EXPECT} for r in picks]


def task_smoke_prompts(task: EvalTask) -> list[dict[str, str]]:
    """Two health-check prompts from a user's held-out rows: two of different labels when they carry labels, else
    the first two; `expect` is the label regex, or any non-blank answer."""
    rows = [r for r in task.rows if len(r.prompt) <= MAX_CONTENT_CHARS]
    picks = rows[:1]
    if rows:
        other = next((r for r in rows[1:] if r.label != rows[0].label), None) if rows[0].label is not None else None
        picks += [other] if other is not None else rows[1:2]
    return [{"prompt": r.prompt, "expect": task.scorer.regex or LOOSE_EXPECT} for r in picks]


def heldout_items(split: str = "test", per_label: int = HELDOUT_PER_LABEL) -> list[dict[str, str]]:
    """The held-out set's items: the first `per_label` rows of each label of `split`, in the split's order."""
    if split == "train":
        raise ConfigError("the held-out set must not come from the training split; use 'test' or 'val'")
    rows = load_split(split)
    picked = [r for label in LABELS for r in [r for r in rows if r["label"] == label][:per_label]]
    return [{"prompt": r["prompt"], "expected": r["label"]} for r in sorted(picked, key=rows.index)]


def task_heldout_items(rows: Sequence[Row], *, per_label: int = HELDOUT_PER_LABEL,
                       unlabelled: int = HELDOUT_UNLABELLED) -> list[dict[str, Any]]:
    """Held-out items from a user's held-out rows, in their order: up to `per_label` of each label (expected: the
    label), or, when no row carries a label, the first `unlabelled` rows (expected: the whole answer). Rows a
    device's set may not hold (too long) are passed over; ConfigError when none is left."""
    labelled = any(r.label is not None for r in rows)
    counts: dict[str, int] = {}
    items: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        expected = row.label if labelled else row.answer
        if expected is None or len(expected) > MAX_EXPECTED_CHARS or not expected.strip():
            continue
        if labelled and counts.get(expected, 0) >= per_label or not labelled and len(items) >= unlabelled:
            continue
        question: dict[str, Any] = ({"prompt": row.prompt} if len(row.messages) == 1 else
                                    {"messages": [{"role": r, "content": c} for r, c in row.messages]})
        item = {**question, "expected": expected}
        try:
            EvalItem.model_validate(item)
        except ValidationError:
            continue  # longer than a device's set allows
        line = len(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()) + 1
        if size + line > MAX_EVAL_SET_BYTES or len(items) == MAX_ITEMS:
            break
        items.append(item)
        size += line
        counts[expected] = counts.get(expected, 0) + 1
    if not items:
        raise ConfigError("no held-out row fits a device's evaluation set (prompts of at most "
                          f"{MAX_CONTENT_CHARS} chars, labels or answers of at most {MAX_EXPECTED_CHARS})")
    return items


def _write_heldout_file(onnx_dir: Path, items: Sequence[dict[str, Any]]) -> None:
    data = "".join(json.dumps(item, separators=(",", ":"), ensure_ascii=False) + "\n" for item in items).encode()
    parse_items(data)  # the device's own reader accepts it
    path = onnx_dir / HELDOUT_FILE
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_heldout(onnx_dir: Path | str, split: str = "test", min_score: float | None = None) -> dict[str, Any]:
    """Write the reference task's `eval/heldout.jsonl` into the model folder; return its entry for eval.json."""
    _write_heldout_file(Path(onnx_dir), heldout_items(split))
    spec = HeldoutSet(file=HELDOUT_FILE, metric=HELDOUT_METRIC, min_score=min_score,
                      max_new_tokens=HELDOUT_NEW_TOKENS, match=MATCH)
    return spec.model_dump(mode="json")


def _task_heldout_spec(task: EvalTask, items: Sequence[dict[str, Any]], min_score: float | None,
                       max_new_tokens: int) -> HeldoutSet:
    labelled = any(r.label is not None for r in task.rows)
    try:
        return HeldoutSet(file=HELDOUT_FILE, metric=HELDOUT_METRIC if labelled else "exact_match",
                          min_score=min_score, max_new_tokens=min(max_new_tokens, MAX_EVAL_NEW_TOKENS),
                          match=task.scorer.match if labelled else "exact")
    except ValidationError as exc:
        raise ConfigError(f"held-out set settings are not valid: {first_error(exc)}") from None


def write_eval(onnx_dir: Path | str, rows: Sequence[Row] | None = None, *, task: EvalTask | None = None,
               heldout_rows: Sequence[Row] | None = None, dataset: str = "task/test", scorer: Scorer | None = None,
               template: Template | None = None, split: str = "test", limit: int | None = None,
               heldout_min_score: float | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
               perplexity_rows: int = PERPLEXITY_ROWS, report: EvalReport | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Evaluate an exported model, write the held-out set and `eval.json` into its folder; return what eval.json
    holds. The task: `task`; else `rows` (held-out rows of a user's task, named `dataset`, scored by `scorer`,
    default "exact"); else the reference task's `split`. `heldout_rows` (default: the task's rows) feed the
    device's held-out set; `report` reuses an evaluation already made (e.g. by `compare`). `heldout_min_score`: the
    device's health check fails below this held-out score (None: it only reports it). Nothing is written when
    anything fails."""
    folder = Path(onnx_dir)
    backend_of(folder, "onnx")
    if task is None:
        if rows is None:
            task = load_task(split=split)
        else:
            task = EvalTask(dataset, tuple(rows), scorer or Scorer())
    if not DATASET_RE.fullmatch(task.dataset):
        raise ConfigError(f"dataset name {clip(task.dataset)} must match {DATASET_RE.pattern}, e.g. 'mytask/test'")
    if heldout_min_score is not None and not 0 <= heldout_min_score <= 1:
        raise ConfigError(f"held-out minimum score must be 0 to 1, not {clip(heldout_min_score)}")
    if task.reference and heldout_rows is None:
        items, smoke = heldout_items(task.split), smoke_prompts(task.split)
        spec = HeldoutSet(file=HELDOUT_FILE, metric=HELDOUT_METRIC, min_score=heldout_min_score,
                          max_new_tokens=HELDOUT_NEW_TOKENS, match=MATCH)
    else:
        source = EvalTask(task.dataset, tuple(heldout_rows), task.scorer) if heldout_rows is not None else task
        task.scorer.check(source.rows, "the held-out rows")
        items, smoke = task_heldout_items(source.rows), task_smoke_prompts(source)
        spec = _task_heldout_spec(source, items, heldout_min_score, max_new_tokens)
    if report is None:
        report = evaluate_task(folder, task.rows, template=template, scorer=task.scorer, backend="onnx", limit=limit,
                               max_new_tokens=max_new_tokens, perplexity_rows=perplexity_rows, progress=progress)
    elif report.backend != "onnx":
        raise ConfigError(f"eval.json describes an exported model; the report given is of a {report.backend} folder")
    result = {"dataset": task.dataset, "metrics": report.metrics, "smoke": smoke,
              "heldout": spec.model_dump(mode="json")}
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    _write_heldout_file(folder, items)
    path = folder / EVAL_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return result

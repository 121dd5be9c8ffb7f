"""Distillation stage 1: a teacher answers the training prompts into a synthetic data set, cached line by line.

Workflow: pick a teacher, `HFTeacher(folder)` (a local Hugging Face model: batched `generate` with left padding,
the chat template through `trainer.dataset.Template`, greedy at temperature 0, otherwise temperature/top-p sampling
seeded per prompt and sample so that the same run gives the same answers) or `OpenAITeacher(base_url, model)` (any
OpenAI-compatible `/chat/completions` endpoint, an slmops agent included: bounded responses, retries with backoff on
429/5xx honouring Retry-After, a one-line ConfigError on 401/403/404 or a refused connection). Then
`teacher_answers(prompts, teacher, cache, samples=, temperature=, max_new_tokens=)` answers every (prompt, sample
index) pair batch by batch and appends each answered batch to `cache` at once (one JSON line per answer, flushed and
fsynced). Each line carries the run's digest (the teacher's identity and the sampling parameters), the prompt's key
and the sample index, so a rerun skips what is there and answers only the rest; a last line cut short by a killed
run is dropped and rewritten, lines of other runs are kept and ignored. It returns the prompts as `Row`s with the
teacher's answers (and a label read from each answer when `label_regex` is given).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from protocol.errors import ConfigError, TransportError, clip
from trainer.dataset import LABEL_RE, MAX_TEXT_CHARS, DataError, Row, Template

if TYPE_CHECKING:
    import httpx

CACHE_VERSION = 1
MAX_CACHE_LINE_BYTES = 4 * MAX_TEXT_CHARS + 1024  # bytes in one cache line (an answer JSON-escaped, plus keys)
MAX_CACHE_BYTES = 4 * 1024**3  # bytes in one cache file
MAX_RESPONSE_BYTES = 4 * 1024**2  # bytes in one teacher HTTP response
MAX_RETRY_AFTER_S = 60.0  # the longest wait a Retry-After header may ask for
MAX_SAMPLES = 64  # answers per prompt
URL_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]{1,255}(/[A-Za-z0-9._~%/\-]{0,255})?")
MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@runtime_checkable
class Teacher(Protocol):
    """Answers prompts. `name` labels it in logs; `identity` keys the cache (changes when its answers would)."""

    name: str
    identity: str
    batch_size: int

    def answer(self, rows: Sequence[Row], *, temperature: float, max_new_tokens: int, seed: int) -> list[str]:
        """One answer per row; `seed` is the sample index, mixed with each row's key by `row_seed`."""
        ...


def row_seed(row: Row, seed: int) -> int:
    """The sampling seed of one (prompt, sample index) pair: the same whatever batch the prompt lands in."""
    digest = hashlib.sha256(f"{row.key()}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def folder_digest(path: Path) -> str:
    """sha256 over a model folder's config, tokenizer and weight files (names and bytes): its content identity."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix in WEIGHT_SUFFIXES or file.suffix == ".json" or file.name.endswith(".model"):
            digest.update(file.name.encode() + b"\0")
            with file.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def check_model_folder(path: Path | str, what: str) -> Path:
    """`path` as a local Hugging Face model folder (config.json present), or a ConfigError naming `what`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{what} {path} is not a Hugging Face model folder (no config.json); pass a local folder")
    return path


# -- local Hugging Face teacher ------------------------------------------------------------------------------------
class HFTeacher:
    """A local Hugging Face causal LM answering in batches (left padding), on CUDA (bf16 where supported) or CPU."""

    def __init__(self, path: Path | str, *, template: Template | None = None, top_p: float = 1.0,
                 batch_size: int = 8, device: str = "auto") -> None:
        self.path = check_model_folder(path, "teacher")
        if not 0 < top_p <= 1 or batch_size < 1 or device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"top_p must be in (0, 1], batch_size >= 1 and device auto, cpu or cuda, not {top_p}, "
                              f"{batch_size} and {clip(device)}")
        self.template = template or Template()
        self.top_p, self.batch_size, self.device = top_p, batch_size, device
        self.name = f"hf:{self.path.name}"
        self.identity = f"hf:{folder_digest(self.path)}:template={self.template.text}:top_p={top_p}"
        self._model: Any = None
        self._tokenizer: Any = None

    def load(self) -> tuple[Any, Any]:
        """The model (eval mode, on its device) and tokenizer (left padding), loaded once."""
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the rich bar of `teacher_answers` is the only one
            from trainer.loop import pick_device

            device, half = pick_device(self.device)  # bf16 on a CUDA device that supports it
            tokenizer = AutoTokenizer.from_pretrained(self.path)
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=half or torch.float32)
            self._model, self._tokenizer = model.to(device).eval(), tokenizer
        return self._model, self._tokenizer

    def unload(self) -> None:
        """Free the model (and its GPU memory) until the next `load`."""
        if self._model is not None:
            import torch

            self._model = self._tokenizer = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def answer(self, rows: Sequence[Row], *, temperature: float, max_new_tokens: int, seed: int) -> list[str]:
        import torch
        from transformers import LogitsProcessorList

        model, tokenizer = self.load()
        texts = [self.template.render(tokenizer, row) for row in rows]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False,
                                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        if temperature > 0:  # greedy over a one-hot of the token each row's own generator drew
            seeds = [row_seed(row, seed) for row in rows]
            options["logits_processor"] = LogitsProcessorList([_SeededSampler(seeds, temperature, self.top_p)])
        with torch.no_grad():
            out = model.generate(**batch, **options)
        new = out[:, batch["input_ids"].shape[1]:]
        return [text.strip()[:MAX_TEXT_CHARS] for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


class _SeededSampler:
    """A logits processor that samples each row with its own seeded generator (temperature, then top-p) and leaves
    only the drawn token, so greedy search picks it: answers do not depend on which rows share a batch."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest head reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        picks = [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, self.generators, strict=True)]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), torch.tensor(picks, device=scores.device)] = 0.0
        return out


# -- OpenAI-compatible endpoint --------------------------------------------------------------------------------------
class OpenAITeacher:
    """An OpenAI-compatible `/chat/completions` endpoint, `concurrency` requests at a time."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, client: httpx.Client | None = None, *,
                 retries: int = 5, timeout_s: float = 120.0, concurrency: int = 4,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import httpx

        base_url = base_url.rstrip("/")
        if not URL_RE.fullmatch(base_url):
            raise ConfigError(f"teacher URL {clip(base_url)} must be http(s)://host[:port][/path], e.g. "
                              "http://127.0.0.1:8080/v1")
        if not MODEL_RE.fullmatch(model):
            raise ConfigError(f"teacher model {clip(model)} must match {MODEL_RE.pattern}")
        if retries < 0 or concurrency < 1:
            raise ConfigError("retries must be >= 0 and concurrency >= 1")
        self.base_url, self.model, self.retries, self.sleep = base_url, model, retries, sleep
        self.batch_size = concurrency
        self.name = f"openai:{model}"
        self.identity = f"openai:{base_url}:{model}"
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout_s)
        self.client.headers.update(headers)

    def answer(self, rows: Sequence[Row], *, temperature: float, max_new_tokens: int, seed: int) -> list[str]:
        if len(rows) == 1:
            return [self._one(rows[0], temperature, max_new_tokens, seed)]
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
            return list(pool.map(lambda r: self._one(r, temperature, max_new_tokens, seed), rows))

    def _one(self, row: Row, temperature: float, max_new_tokens: int, seed: int) -> str:
        import httpx

        url = f"{self.base_url}/chat/completions"
        body = {"model": self.model, "messages": [{"role": r, "content": c} for r, c in row.messages],
                "temperature": temperature, "max_tokens": max_new_tokens, "seed": row_seed(row, seed)}
        for attempt in range(self.retries + 1):
            try:
                status, headers, data = self._post(url, body)
            except httpx.ConnectError as exc:
                raise ConfigError(f"cannot reach the teacher at {url}: {clip(str(exc))}; is the server running?"
                                  ) from exc
            except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                status, headers, data = 0, {}, str(exc).encode()
            if status == 200:
                return _content(data, url)
            if status in (401, 403):
                raise ConfigError(f"the teacher at {url} refused the API key (HTTP {status}); pass the right "
                                  "--teacher-api-key")
            if status == 404:
                raise ConfigError(f"the teacher at {url} answered 404 for model {self.model!r}: {_message(data)}; "
                                  "check --teacher-url (it ends before /chat/completions) and --teacher-model")
            if status not in (0, 429) and status < 500:
                raise ConfigError(f"the teacher at {url} refused the request (HTTP {status}): {_message(data)}")
            if attempt < self.retries:
                self.sleep(_retry_after(headers, attempt))
        raise TransportError(f"the teacher at {url} kept failing (last: HTTP {status or 'timeout'} "
                             f"{_message(data)}) after {self.retries} retries; try again later")

    def _post(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and at most MAX_RESPONSE_BYTES of body (a longer answer is an error)."""
        with self.client.stream("POST", url, json=body) as response:
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_RESPONSE_BYTES:
                    raise ConfigError(f"the teacher at {url} sent more than {MAX_RESPONSE_BYTES} bytes")
            return response.status_code, dict(response.headers), bytes(data)


def _retry_after(headers: dict[str, str], attempt: int) -> float:
    given = headers.get("retry-after", "")
    try:
        return min(max(float(given), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return min(0.5 * 2**attempt, MAX_RETRY_AFTER_S)


def _message(data: bytes) -> str:
    try:
        return clip(str(json.loads(data)["error"]["message"]))
    except (ValueError, KeyError, TypeError):
        return clip(data[:200].decode("utf-8", "replace"))


def _content(data: bytes, url: str) -> str:
    try:
        content = json.loads(data)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise TransportError(f"the teacher at {url} sent no choices[0].message.content") from exc
    if not isinstance(content, str):
        raise TransportError(f"the teacher at {url} sent a content that is not a string")
    return content.strip()[:MAX_TEXT_CHARS]


# -- the cache and stage 1 -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """What decides a teacher's answers besides the prompt: part of the cache digest."""

    temperature: float
    max_new_tokens: int

    def digest(self, teacher: Teacher) -> str:
        text = json.dumps({"v": CACHE_VERSION, "teacher": teacher.identity, "temperature": self.temperature,
                           "max_new_tokens": self.max_new_tokens}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_cache(cache: Path, run: str) -> dict[tuple[str, int], str]:
    """Answers of run `run` in `cache` by (prompt key, sample); a cut last line is dropped from the file."""
    answers: dict[tuple[str, int], str] = {}
    if not cache.exists():
        return answers
    size = cache.stat().st_size
    if size > MAX_CACHE_BYTES:
        raise ConfigError(f"teacher cache {cache} is {size} bytes; the limit is {MAX_CACHE_BYTES}")
    data = cache.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a line cut short by a killed run: drop it, it is answered again
        with cache.open("r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            if len(line) > MAX_CACHE_LINE_BYTES:
                raise ValueError("line too long")
            item = json.loads(line)
            key, sample, answer = item["prompt"], item["sample"], item["answer"]
            if not (isinstance(key, str) and isinstance(sample, int) and isinstance(answer, str)):
                raise ValueError("bad field types")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"teacher cache {cache} line {number} is damaged ({clip(str(exc))}); delete the file "
                              "to answer everything again") from None
        if item.get("run") == run:
            answers[(key, sample)] = answer
    return answers


def _append(cache: Path, lines: list[dict[str, Any]]) -> None:
    with cache.open("ab") as f:
        f.write(b"".join(json.dumps(x, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for x in lines))
        f.flush()
        os.fsync(f.fileno())


def label_of(answer: str, label_regex: re.Pattern[str] | None) -> str | None:
    """The label read from the start of an answer (group 'label', else group 1, else the match), if it is one."""
    if label_regex is None or not (m := label_regex.match(answer)):
        return None
    label = m.group("label") if "label" in m.re.groupindex else m.group(1) if m.re.groups else m.group(0)
    return label if label and LABEL_RE.fullmatch(label) else None


@dataclass(frozen=True)
class Stage1:
    """What stage 1 gave: the answered rows, the run digest, answers taken from the cache and answered now."""

    rows: list[Row]
    run: str
    cached: int
    answered: int


def teacher_answers(prompts: Sequence[Row], teacher: Teacher, cache: Path | str, *, samples: int = 1,
                    temperature: float = 0.0, max_new_tokens: int = 128, label_regex: str | None = None,
                    progress: bool = True) -> list[Row]:
    """Every prompt answered `samples` times (prompt order, then sample order), resuming from `cache`."""
    return answer_prompts(prompts, teacher, cache, samples=samples, temperature=temperature,
                          max_new_tokens=max_new_tokens, label_regex=label_regex, progress=progress).rows


def answer_prompts(prompts: Sequence[Row], teacher: Teacher, cache: Path | str, *, samples: int = 1,
                   temperature: float = 0.0, max_new_tokens: int = 128, label_regex: str | None = None,
                   progress: bool = True) -> Stage1:
    """`teacher_answers` with the counts: what came from the cache and what the teacher answered now."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    if not 1 <= samples <= MAX_SAMPLES or not 0 <= temperature <= 2 or max_new_tokens < 1:
        raise ConfigError(f"samples must be 1..{MAX_SAMPLES}, temperature 0..2 and max_new_tokens >= 1")
    if samples > 1 and temperature == 0:
        raise ConfigError("samples > 1 at temperature 0 gives the same answer each time; raise --temperature")
    if not prompts:
        raise DataError("no prompts to answer")
    try:
        pattern = re.compile(label_regex) if label_regex is not None else None
    except re.error as exc:
        raise ConfigError(f"label_regex {clip(label_regex or '')} is not a regular expression: {exc}") from None
    cache = Path(cache)
    run = Sampling(temperature, max_new_tokens).digest(teacher)
    answers = read_cache(cache, run)
    cached = sum((row.key(), s) in answers for row in {r.key(): r for r in prompts}.values() for s in range(samples))
    todo: dict[int, dict[str, Row]] = {s: {} for s in range(samples)}
    for row in prompts:
        for s in range(samples):
            if (row.key(), s) not in answers:
                todo[s].setdefault(row.key(), row)
    pending = sum(len(rows) for rows in todo.values())
    cache.parent.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn(f"teacher {teacher.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("answers", total=cached + pending, completed=cached)
        for s, rows in todo.items():
            items = list(rows.values())
            for i in range(0, len(items), teacher.batch_size):
                batch = items[i : i + teacher.batch_size]
                got = teacher.answer(batch, temperature=temperature, max_new_tokens=max_new_tokens, seed=s)
                if len(got) != len(batch):
                    raise TransportError(f"teacher {teacher.name} gave {len(got)} answers for {len(batch)} prompts")
                _append(cache, [{"run": run, "prompt": r.key(), "sample": s, "answer": a}
                                for r, a in zip(batch, got, strict=True)])
                answers.update({(r.key(), s): a for r, a in zip(batch, got, strict=True)})
                bar.update(task, advance=len(batch))
    rows = [Row(row.messages, answers[(row.key(), s)], label_of(answers[(row.key(), s)], pattern))
            for row in prompts for s in range(samples)]
    return Stage1(rows, run, cached, pending)

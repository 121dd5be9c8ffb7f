"""The loaded model and token-by-token generation; nothing here knows about HTTP or queues.

Workflow: `LoadedModel.load(folder, ref, threads=, spinning=)` opens an onnxruntime-genai model folder with the
session's thread settings; `prompt_ids(messages)` applies the model's chat template (ChatML when it has none) and
`text_ids(text)` encodes raw text; `steps(ids, sampling)` creates one generator and yields a `Step` per decoded
token (its id, its text, and its log-probabilities when asked), stopping at end of sequence or the token budget.
The caller (agent/scheduler.py) decides between two steps whether to go on, so cancelling costs at most one token.
`generate(...)` is the simple whole-answer loop the health check uses. Prompts and answers are never logged.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import numpy as np  # noqa: E402
import onnxruntime_genai as og  # noqa: E402

from protocol.errors import HealthCheckError, SlmopsError  # noqa: E402

from .store import ModelRef  # noqa: E402

GUIDANCE_KINDS = ("json_schema", "regex", "lark_grammar")


class ModelNotLoaded(SlmopsError):
    """No model is active on this device yet; deploy one from the fleet."""

    code = "no_model"


class GuidanceError(SlmopsError):
    """The requested output constraint (JSON schema, regex, grammar) cannot be enforced by the decoder."""

    code = "invalid_response_format"


@dataclass(frozen=True)
class Sampling:
    """How one request decodes."""

    max_tokens: int  # tokens: the answer's budget (the caller has checked it fits the context)
    temperature: float = 0.0  # 0: greedy and repeatable
    top_p: float = 1.0
    seed: int | None = None
    guidance: tuple[str, str] | None = None  # (kind in GUIDANCE_KINDS, text): enforced while decoding
    top_logprobs: int | None = None  # None: no log-probabilities; 0..20: the chosen token's and this many others


@dataclass(frozen=True)
class Step:
    """One decoded token."""

    token: int
    text: str  # the text this token completes (may be "" while a multi-byte character is incomplete)
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass
class Completion:
    """What one generation produced (filled in while it runs)."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    seconds: float = 0.0


def format_chatml(messages: list[dict]) -> str:
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


def session_overlay(threads: int, spinning: bool) -> str:
    """genai_config overlay with the onnxruntime session's thread settings (threads 0: one per usable core)."""
    n = threads or len(os.sched_getaffinity(0))
    spin = "1" if spinning else "0"
    # onnxruntime-genai passes string-valued keys it does not know on as session config entries
    opts = {
        "intra_op_num_threads": n,
        "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": spin,
        "session.inter_op.allow_spinning": spin,
    }
    return json.dumps({"model": {"decoder": {"session_options": opts}}})


@dataclass
class LoadedModel:
    ref: ModelRef
    path: Path
    model: og.Model = field(repr=False)
    tokenizer: og.Tokenizer = field(repr=False)
    context_length: int
    eos: frozenset[int] = frozenset()
    use_template: bool = True

    @classmethod
    def load(cls, path: Path, ref: ModelRef, *, threads: int = 0, spinning: bool = False) -> "LoadedModel":
        try:
            config = og.Config(str(path))
            config.overlay(session_overlay(threads, spinning))
            model = og.Model(config)
            tokenizer = og.Tokenizer(model)
        except Exception as exc:  # onnxruntime-genai raises plain RuntimeError
            raise HealthCheckError(f"onnxruntime-genai could not load {path}: {exc}") from exc
        try:
            cfg = json.loads((path / "genai_config.json").read_text())
            ctx = int(cfg["model"].get("context_length") or cfg["search"].get("max_length") or 2048)
            ctx = min(ctx, int(cfg["search"].get("max_length") or ctx))
        except (OSError, KeyError, ValueError, TypeError):
            ctx = 2048
        return cls(ref=ref, path=path, model=model, tokenizer=tokenizer, context_length=ctx,
                   eos=frozenset(int(t) for t in tokenizer.eos_token_ids))

    @property
    def id(self) -> str:
        return f"{self.ref.name}:v{self.ref.version}"

    def prompt(self, messages: list[dict]) -> str:
        """The model's own chat template when onnxruntime-genai can apply it, else ChatML."""
        if self.use_template:
            try:
                return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
            except Exception:
                self.use_template = False
        return format_chatml(messages)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(self.prompt(messages))]

    def text_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def steps(self, ids: list[int], sampling: Sampling) -> Iterator[Step]:
        """Yield one `Step` per generated token until end of sequence or `sampling.max_tokens`."""
        if not ids:
            raise ValueError("the prompt is empty")
        budget = min(sampling.max_tokens, self.context_length - len(ids))
        if budget < 1:
            raise ValueError(f"prompt is {len(ids)} tokens; this model's context holds {self.context_length}")
        params = og.GeneratorParams(self.model)
        opts: dict = {"max_length": len(ids) + budget}
        if sampling.temperature > 0:
            opts.update(do_sample=True, temperature=float(sampling.temperature), top_p=float(sampling.top_p))
            if sampling.seed is not None:
                opts["random_seed"] = int(sampling.seed) & 0x7FFFFFFF
        else:
            opts["do_sample"] = False
        params.set_search_options(**opts)
        if sampling.guidance is not None:
            params.set_guidance(*sampling.guidance)
        try:
            gen = og.Generator(self.model, params)
        except RuntimeError as exc:  # llguidance reports a schema or grammar it cannot compile here
            if sampling.guidance is not None:
                raise GuidanceError(f"cannot enforce this {sampling.guidance[0]}: {_first_line(exc)}") from exc
            raise
        gen.append_tokens(ids)
        stream = self.tokenizer.create_stream()
        want_logprobs = sampling.top_logprobs is not None
        for _ in range(budget):
            # onnxruntime-genai 0.18: the logits read before a step are the ones that step samples from
            logits = gen.get_logits() if want_logprobs else None
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in self.eos:
                return
            step_lp, top = None, ()
            if logits is not None:
                step_lp, top = _logprobs(logits, token, sampling.top_logprobs or 0)
            yield Step(token, stream.decode(token), step_lp, top)

    def generate(
        self,
        messages: list[dict],
        *,
        max_tokens: int = 128,
        deadline: float | None = None,
        out: Completion | None = None,
    ) -> Iterator[str]:
        """Greedy whole-answer loop (the health check's): yield text pieces; `out` collects counts and finish."""
        out = out if out is not None else Completion()
        start = time.perf_counter()
        ids = self.prompt_ids(messages)
        out.prompt_tokens = len(ids)
        budget = min(max_tokens, self.context_length - len(ids))
        out.finish_reason = "stop"
        for step in self.steps(ids, Sampling(max_tokens=max_tokens)):
            if deadline is not None and time.monotonic() > deadline:
                out.finish_reason = "timeout"
                break
            out.completion_tokens += 1
            out.text += step.text
            out.seconds = time.perf_counter() - start
            if step.text:
                yield step.text
        else:
            if out.completion_tokens >= budget:
                out.finish_reason = "length"
        out.seconds = time.perf_counter() - start


def _logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    shifted = row - row.max()
    lp = shifted - np.log(np.exp(shifted).sum())
    top: tuple[tuple[int, float], ...] = ()
    if k:
        idx = np.argpartition(-lp, min(k, lp.size - 1))[:k]
        idx = idx[np.argsort(-lp[idx])]
        top = tuple((int(i), float(lp[i])) for i in idx)
    return float(lp[token]), top


def _first_line(exc: BaseException, n: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = " ".join(s.strip() for s in text[:3]) if text else type(exc).__name__
    return line[:n]

"""The loaded model, generation, and hot swap.

Workflow: `LoadedModel.load(folder, ref)` opens an onnxruntime-genai model folder; `Runtime` holds the one that
serves and swaps in another under a lock (`swap`), so requests in flight finish on the old model and the next
ones use the new. `Runtime.chat(...)` formats OpenAI-style messages with the model's chat template and yields
text pieces as tokens are decoded; counters feed telemetry. Prompts and answers are never logged or stored.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime_genai as og  # noqa: E402

from protocol.errors import HealthCheckError, SlmopsError  # noqa: E402

from .store import ModelRef  # noqa: E402


class ModelNotLoaded(SlmopsError):
    """No model is active on this device yet; deploy one from the fleet."""

    code = "no_model"


@dataclass
class Completion:
    """What one generation produced (filled in while it streams)."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    seconds: float = 0.0


def format_chatml(messages: list[dict]) -> str:
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


@dataclass
class LoadedModel:
    ref: ModelRef
    path: Path
    model: og.Model = field(repr=False)
    tokenizer: og.Tokenizer = field(repr=False)
    context_length: int
    use_template: bool = True

    @classmethod
    def load(cls, path: Path, ref: ModelRef) -> "LoadedModel":
        try:
            model = og.Model(str(path))
            tokenizer = og.Tokenizer(model)
        except Exception as exc:  # onnxruntime-genai raises plain RuntimeError
            raise HealthCheckError(f"onnxruntime-genai could not load {path}: {exc}") from exc
        try:
            cfg = json.loads((path / "genai_config.json").read_text())
            ctx = int(cfg["model"].get("context_length") or cfg["search"].get("max_length") or 2048)
        except (OSError, KeyError, ValueError, TypeError):
            ctx = 2048
        return cls(ref=ref, path=path, model=model, tokenizer=tokenizer, context_length=ctx)

    def prompt(self, messages: list[dict]) -> str:
        """The model's own chat template when onnxruntime-genai can apply it, else ChatML."""
        if self.use_template:
            try:
                return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
            except Exception:
                self.use_template = False
        return format_chatml(messages)

    def generate(
        self,
        messages: list[dict],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        deadline: float | None = None,
        out: Completion | None = None,
    ) -> Iterator[str]:
        """Yield decoded text pieces; `out` collects counts and the finish reason."""
        out = out if out is not None else Completion()
        start = time.perf_counter()
        ids = self.tokenizer.encode(self.prompt(messages))
        out.prompt_tokens = len(ids)
        room = self.context_length - len(ids)
        if room < 1:
            raise ValueError(f"prompt is {len(ids)} tokens; this model's context holds {self.context_length}")
        budget = min(max_tokens, room)
        params = og.GeneratorParams(self.model)
        opts: dict = {"max_length": len(ids) + budget}
        if temperature > 0:
            opts.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
            if seed is not None:
                opts["random_seed"] = int(seed)
        else:
            opts["do_sample"] = False
        params.set_search_options(**opts)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        stream = self.tokenizer.create_stream()
        out.finish_reason = "length"
        while not gen.is_done():
            if deadline is not None and time.monotonic() > deadline:
                out.finish_reason = "timeout"
                break
            gen.generate_next_token()
            token = gen.get_next_tokens()[0]
            if token in self.tokenizer.eos_token_ids:
                out.finish_reason = "stop"
                break
            out.completion_tokens += 1
            piece = stream.decode(token)
            out.text += piece
            out.seconds = time.perf_counter() - start
            if piece:
                yield piece
        else:
            if out.completion_tokens < budget:
                out.finish_reason = "stop"
        out.seconds = time.perf_counter() - start


class Runtime:
    """The model that serves local requests, swappable while the API runs."""

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._swap_lock = threading.Lock()
        self._gen_lock = threading.Lock()  # one generation at a time: small devices have few cores
        self.started = time.monotonic()
        self.requests_total = 0
        self.tokens_total = 0
        self._recent_tps = 0.0

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def swap(self, new: LoadedModel | None) -> LoadedModel | None:
        """Serve `new` from the next request on; return the model it replaced."""
        with self._swap_lock:
            old, self._current = self._current, new
            return old

    def chat(self, messages: list[dict], out: Completion, **kw) -> Iterator[str]:
        model = self._current
        if model is None:
            raise ModelNotLoaded("no model is active on this device yet; deploy a bundle from the fleet")
        with self._gen_lock:
            self.requests_total += 1
            try:
                yield from model.generate(messages, out=out, **kw)
            finally:
                self.tokens_total += out.completion_tokens
                if out.seconds > 0 and out.completion_tokens:
                    self._recent_tps = out.completion_tokens / out.seconds

    @property
    def tokens_per_s(self) -> float:
        return self._recent_tps

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

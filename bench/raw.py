"""The raw baseline: onnxruntime-genai run directly in the benchmark process, as a single-worker server would.

Workflow: `RawRunner(folder, threads, spin)` opens the folder with the decoder's intra-op thread count and
spinning overlaid on its genai_config (any string key in `session_options` becomes an onnxruntime session config
entry; the inter-op pool is one thread, unused by sequential execution); `generate(messages, max_tokens, t0=...)` applies the model's chat template, encodes, decodes greedily
token by token with a tokenizer stream, and stops at its own token count (onnxruntime-genai 0.18: do not rely on
`is_done()` alone) or at an end-of-sequence token, as the agent does. Timing starts at `t0`, before the template
is applied, because the agent's request time includes that too.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime_genai as og  # noqa: E402

from .sample import Sample  # noqa: E402


def resolve_threads(threads: int) -> int:
    """The agent's meaning of 0 ("one per core the process may use") as a concrete count."""
    return threads or len(os.sched_getaffinity(0))


def session_overlay(threads: int, spin: bool) -> str:
    flag = "1" if spin else "0"
    options = {
        "intra_op_num_threads": resolve_threads(threads),
        "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": flag,
        "session.inter_op.allow_spinning": flag,
    }
    return json.dumps({"model": {"decoder": {"session_options": options}}})


class RawRunner:
    def __init__(self, folder, threads: int, spin: bool) -> None:
        config = og.Config(str(folder))
        config.overlay(session_overlay(threads, spin))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.eos = set(self.tokenizer.eos_token_ids)

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer.encode(self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)))

    def generate(self, messages: list[dict], max_tokens: int, *, t0: float | None = None) -> Sample:
        t0 = time.perf_counter() if t0 is None else t0
        prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)
        stream = self.tokenizer.create_stream()
        pieces: list[str] = []
        first = None
        while len(pieces) < max_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos:
                break
            piece = stream.decode(token)
            if piece and first is None:
                first = time.perf_counter()
            pieces.append(piece)
        end = time.perf_counter()
        text = "".join(pieces)
        return Sample(None if first is None else first - t0, end - t0, len(pieces), len(text))

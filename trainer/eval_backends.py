"""The two runtimes `trainer.evaluate` scores a model with, and the fresh process each model is measured in.

Workflow: `open_runner(folder, backend, device, threads)` opens an onnxruntime-genai folder (`genai_config.json`) as
an `OnnxRunner` or a Hugging Face folder (`config.json`, PyTorch via transformers, CPU or CUDA) as an `HFRunner`.
Both answer the same three questions: `render(row, template)` (the text the model reads before its answer),
`answer(text, max_new_tokens)` (a greedy answer with its time to first token and decode time) and
`answer_nll(row, template)` (the summed negative log-likelihood of the reference answer and its end token,
teacher-forced: one forward pass for PyTorch; for onnxruntime-genai 0.18 the whole sequence is appended and the
`logits` output read for every position, or one position per step where a model gives only the last one).

`run_isolated(request)` evaluates one model in a new Python process (`python -m trainer.eval_backends`, the request
as JSON on stdin, the rows in a JSONL file) so its peak resident memory is its own: the child reports its resident
high-water mark (`VmHWM` of /proc/self/status on Linux, `ru_maxrss` elsewhere; see `peak_rss_mb`) after loading the
model and answering every row: the whole process, Python and the runtime libraries included, i.e. what a machine
must have free to run this evaluation. torch is imported only for HF folders.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from protocol.errors import ConfigError, SlmopsError, clip

if TYPE_CHECKING:
    from trainer.dataset import Row, Template

BACKENDS = ("auto", "onnx", "hf")
DEVICES = ("auto", "cpu", "cuda")
CHILD_TIMEOUT_S = 6 * 3600  # seconds one model's evaluation may take in its own process
MAX_REPLY_BYTES = 1024 * 1024  # bytes of the child's answer on stdout


@dataclass(frozen=True)
class Generation:
    """One greedy answer and what it cost: whole time, and time until its first token was known."""

    text: str
    new_tokens: int
    seconds: float
    ttft_s: float = 0.0


class Runner(Protocol):
    backend: str

    def render(self, row: Row, template: Template) -> str: ...
    def answer(self, text: str, max_new_tokens: int) -> Generation: ...
    def answer_nll(self, row: Row, template: Template) -> tuple[float, int]: ...


def backend_of(folder: Path | str, backend: str = "auto") -> str:
    """"onnx" or "hf" for `folder`; ConfigError when it is missing or is neither kind of model folder."""
    folder = Path(folder)
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {clip(backend)}")
    if not folder.is_dir():
        raise ConfigError(f"model folder {folder} does not exist; pass an exported or a Hugging Face model folder")
    found = "onnx" if (folder / "genai_config.json").is_file() else "hf" if (folder / "config.json").is_file() else None
    if found is None:
        raise ConfigError(f"{folder} is neither an onnxruntime-genai folder (genai_config.json) nor a Hugging Face "
                          "folder (config.json); pass the folder export or training wrote")
    if backend != "auto" and backend != found:
        raise ConfigError(f"{folder} is an {found} model folder, not {backend}; drop the backend or pick {found}")
    return found


def log_softmax_at(logits: Any, token: int) -> float:
    """log p(token) under one row of logits (numpy), in float64."""
    import numpy as np

    row = logits.astype(np.float64)
    top = row.max()
    return float(row[token] - top - math.log(np.exp(row - top).sum()))


class _OgChat:
    """The onnxruntime-genai tokenizer seen through the two names `trainer.dataset.Template` uses."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        try:
            tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "x"}]), add_generation_prompt=True)
            self.chat_template: str | None = "model"
        except RuntimeError:  # the model ships no chat template
            self.chat_template = None

    def apply_chat_template(self, messages: list[dict[str, str]], *, tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        return self._tok.apply_chat_template(json.dumps(messages), add_generation_prompt=add_generation_prompt)


class OnnxRunner:
    """An onnxruntime-genai model folder."""

    backend = "onnx"

    def __init__(self, folder: Path) -> None:
        from trainer.evaluate import load

        self.model, self.tokenizer = load(folder)
        self._chat = _OgChat(self.tokenizer)

    def render(self, row: Row, template: Template) -> str:
        return template.render(self._chat, row)

    def answer(self, text: str, max_new_tokens: int) -> Generation:
        from trainer.evaluate import generate

        return generate(self.model, self.tokenizer, text, max_new_tokens)

    def answer_nll(self, row: Row, template: Template) -> tuple[float, int]:
        import numpy as np
        import onnxruntime_genai as og

        head = [int(t) for t in self.tokenizer.encode(self.render(row, template))]
        tail = [int(t) for t in self.tokenizer.encode(row.answer or "")] + [int(self.tokenizer.eos_token_ids[0])]
        ids = head + tail
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.array(ids, dtype=np.int32))
        logits = generator.get_output("logits")
        nll = 0.0
        if logits.shape[1] == len(ids):  # every position in one pass
            for i, token in enumerate(tail):
                nll -= log_softmax_at(logits[0, len(head) + i - 1], token)
            return nll, len(tail)
        generator = og.Generator(self.model, params)  # only the last position: one step per answer token
        generator.append_tokens(np.array(head, dtype=np.int32))
        for token in tail:
            nll -= log_softmax_at(generator.get_logits()[0, -1], token)
            generator.append_tokens(np.array([token], dtype=np.int32))
        return nll, len(tail)


def pick_device(device: str) -> str:
    """"cpu" or "cuda" for a PyTorch model; "auto" takes CUDA when torch sees it."""
    import torch

    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, not {clip(device)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked but torch sees no CUDA device; use --device cpu or auto")
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


class HFRunner:
    """A Hugging Face causal-LM folder run with PyTorch: float32 on CPU, bf16 on CUDA where supported."""

    backend = "hf"

    def __init__(self, folder: Path, device: str = "auto", threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device = pick_device(device)
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        bf16 = self.device == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the Hugging Face model in {folder}: {clip(str(exc).splitlines()[0])}") from exc
        self.model.to(self.device).eval()
        stop = {self.tokenizer.eos_token_id, *_as_list(getattr(self.model.generation_config, "eos_token_id", None))}
        self.stop = {int(t) for t in stop if t is not None}

    def render(self, row: Row, template: Template) -> str:
        return template.render(self.tokenizer, row)

    def answer(self, text: str, max_new_tokens: int) -> Generation:
        import torch

        start = time.perf_counter()
        ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)], device=self.device)
        new: list[int] = []
        ttft = None
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True)
            while True:
                token = int(out.logits[0, -1].argmax())  # int() waits for the device
                ttft = time.perf_counter() - start if ttft is None else ttft
                if token in self.stop:
                    break
                new.append(token)
                if len(new) >= max_new_tokens:
                    break
                step = torch.tensor([[token]], device=self.device)
                out = self.model(input_ids=step, use_cache=True, **_cache_of(out))
        text_out = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(text=text_out.strip(), new_tokens=len(new), seconds=time.perf_counter() - start,
                          ttft_s=ttft or 0.0)

    def answer_nll(self, row: Row, template: Template) -> tuple[float, int]:
        import torch

        from trainer.dataset import encode

        ids, start = encode(self.tokenizer, row, template)
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=x).logits[0, start - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, start:], reduction="sum")
        return float(nll), len(ids) - start


def _cache_of(out: Any) -> dict[str, Any]:
    """The key/value cache of a forward pass, under the keyword this transformers version takes it back by."""
    return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def open_runner(folder: Path | str, backend: str = "auto", device: str = "auto", threads: int | None = None) -> Runner:
    """The runner for `folder` (see `backend_of`)."""
    kind = backend_of(folder, backend)
    return OnnxRunner(Path(folder)) if kind == "onnx" else HFRunner(Path(folder), device, threads)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (10^6 bytes): Linux's VmHWM, the high-water mark of this
    program's own memory. (`ru_maxrss` is no use on Linux: it keeps the high-water mark of the process image before
    exec, which for a child of a large parent is the parent's size.) Elsewhere `ru_maxrss`."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


def run_isolated(request: dict[str, Any], *, progress: bool) -> dict[str, float]:
    """Evaluate in a new process (see the module docstring); its metrics, `peak_rss_mb` included."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        done = subprocess.run([sys.executable, "-m", "trainer.eval_backends"], input=json.dumps(request).encode(),
                              stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, env=env,
                              timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"evaluating {request['model']} took over {CHILD_TIMEOUT_S} s; pass a smaller --limit") from exc
    lines = done.stdout[-MAX_REPLY_BYTES:].decode("utf-8", "replace").strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except ValueError:
        reply = {}
    if isinstance(reply, dict) and isinstance(reply.get("error"), str):
        raise ConfigError(reply["error"].splitlines()[0][:500])
    if done.returncode != 0 or not isinstance(reply, dict) or not isinstance(reply.get("metrics"), dict):
        tail = (done.stderr or b"").decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"evaluating {request['model']} failed in its process (exit {done.returncode}): "
                          f"{clip(tail[0])}")
    return {str(k): float(v) for k, v in reply["metrics"].items()}


def _child() -> int:
    """Entry point of the evaluation process: a request on stdin, one JSON line on stdout."""
    from trainer.evaluate import request_metrics

    try:
        request = json.loads(sys.stdin.buffer.read(MAX_REPLY_BYTES))
        metrics = request_metrics(request)
        metrics["peak_rss_mb"] = peak_rss_mb()
        reply: dict[str, Any] = {"metrics": metrics}
    except SlmopsError as exc:
        reply = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line, which raises ConfigError
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(reply, allow_nan=False) + "\n")
    return 0 if "metrics" in reply else 1


if __name__ == "__main__":
    raise SystemExit(_child())

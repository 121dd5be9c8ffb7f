"""Evaluate an exported onnxruntime-genai model on the triage task and write its `eval.json`.

Workflow: `load()` opens the folder with onnxruntime-genai; `chat_prompt()` wraps a user message with the
tokenizer's own chat template (the raw text when the model has none); `generate()` decodes greedily and times it.
`evaluate()` runs every row of a split and returns the metrics; `write_eval()` stores them in `eval.json` next to
the model, with two smoke prompts the device's health check sends after an install, and writes a small held-out
set (`eval/heldout.jsonl`: the first `HELDOUT_PER_LABEL` rows of each label of the test split, never the training
split) into the model folder, named under `heldout` in `eval.json`. The bundle builder reads that file for the
manifest's eval metrics, health-check prompts and held-out set (which it packs like any other model file); the
device scores the set in its health check with the same rule `label_accuracy` is scored with here (`MATCH`,
`protocol.evalset`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import ConfigError
from protocol.evalset import is_right
from protocol.manifest import HeldoutSet, RegexMatch
from trainer.task import ANSWER_RE, DATASET, LABELS, load_split

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    import onnxruntime_genai as og

EVAL_FILE = "eval.json"
SMOKE_EXPECT = r"^(ok|warning|fault):"
MAX_NEW_TOKENS = 32
HELDOUT_FILE = "eval/heldout.jsonl"  # inside the model folder, so the bundle carries it and its hash
HELDOUT_PER_LABEL = 10  # rows of each label in the held-out set (30 in all: about 4 kB, well under a second on a device)
HELDOUT_METRIC = "label_accuracy"  # the device's score is the same measure as the trainer's metric of that name
HELDOUT_NEW_TOKENS = 16  # tokens: enough for the label and its colon
MATCH = RegexMatch(regex=ANSWER_RE.pattern)  # the answer's label is the group of `^(ok|warning|fault): `


@dataclass(frozen=True)
class Generation:
    """One greedy answer and what it cost."""

    text: str
    new_tokens: int
    seconds: float


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
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in stop:
            break
        new.append(token)
    answer = tokenizer.decode(new)
    return Generation(text=answer.strip(), new_tokens=len(new), seconds=time.perf_counter() - start)


def evaluate(onnx_dir: Path | str, split: str = "test", limit: int | None = None) -> dict[str, float]:
    """Greedy-decode each row of `split` and score the answers; every metric is a float."""
    model, tokenizer = load(onnx_dir)
    rows = load_split(split)[:limit]
    labels = formats = exact = tokens = 0
    seconds = 0.0
    for row in rows:
        out = generate(model, tokenizer, chat_prompt(tokenizer, row["prompt"]))
        labels += is_right(out.text, row["label"], MATCH)
        formats += bool(ANSWER_RE.match(out.text))
        exact += out.text == row["answer"]
        tokens += out.new_tokens
        seconds += out.seconds
    n = max(1, len(rows))
    return {
        "label_accuracy": labels / n,
        "format_rate": formats / n,
        "exact_match": exact / n,
        "latency_ms_mean": 1000 * seconds / n,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "samples": float(len(rows)),
    }


def smoke_prompts(split: str = "test") -> list[dict[str, str]]:
    """Two health-check prompts: the first fault and the first ok line of the split."""
    rows = load_split(split)
    picks = [next(r for r in rows if r["label"] == label) for label in ("fault", "ok")]
    return [{"prompt": r["prompt"], "expect": SMOKE_EXPECT} for r in picks]


def heldout_items(split: str = "test", per_label: int = HELDOUT_PER_LABEL) -> list[dict[str, str]]:
    """The held-out set's items: the first `per_label` rows of each label of `split`, in the split's order."""
    if split == "train":
        raise ConfigError("the held-out set must not come from the training split; use 'test' or 'val'")
    rows = load_split(split)
    picked = [r for label in LABELS for r in [r for r in rows if r["label"] == label][:per_label]]
    return [{"prompt": r["prompt"], "expected": r["label"]} for r in sorted(picked, key=rows.index)]


def write_heldout(onnx_dir: Path | str, split: str = "test", min_score: float | None = None) -> dict[str, Any]:
    """Write `eval/heldout.jsonl` into the model folder; return its entry for eval.json (a `HeldoutSet`)."""
    path = Path(onnx_dir) / HELDOUT_FILE
    path.parent.mkdir(exist_ok=True)
    lines = "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in heldout_items(split))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text(lines, encoding="utf-8")
    os.replace(tmp, path)
    spec = HeldoutSet(file=HELDOUT_FILE, metric=HELDOUT_METRIC, min_score=min_score,
                      max_new_tokens=HELDOUT_NEW_TOKENS, match=MATCH)
    return spec.model_dump(mode="json")


def write_eval(onnx_dir: Path | str, split: str = "test", limit: int | None = None,
               heldout_min_score: float | None = None) -> dict[str, Any]:
    """Evaluate the model, write the held-out set and `eval.json` into its folder; return what eval.json holds.
    `heldout_min_score`: the device's health check fails below this held-out score (None: it only reports it)."""
    result = {
        "dataset": f"{DATASET}/{split}",
        "metrics": evaluate(onnx_dir, split, limit),
        "smoke": smoke_prompts(split),
        "heldout": write_heldout(onnx_dir, split, heldout_min_score),
    }
    path = Path(onnx_dir) / EVAL_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return result

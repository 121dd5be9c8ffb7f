"""The two models the agent benchmark runs, built locally and cached under `.cache/bench/`.

Workflow of `ensure(name)`:
1. build the Hugging Face folder (`hf/`) if it is missing: "tiny" is the project's tiny model
   (`trainer.tiny.build_tiny`, 300 steps, seed 0); "qwen05" is a Qwen2.5-0.5B-shaped Qwen2 with random weights
   and a byte-level BPE tokenizer padded with filler tokens so that it covers all 151936 ids;
2. export it to int4 with `trainer.export.export` into a temporary sibling, make end-of-sequence unreachable so
   every generation runs to its token budget on both sides (tiny: genai_config's eos_token_id points at the byte
   token for NUL, which never occurs in the training text; qwen05: the tied embedding row of the eos token is
   zero, so its logit is 0 while the best of 151935 random logits is positive), write `bench-model.json` with
   the build times, and rename the folder into place, so a half-built folder is never reused.
Every folder is built in a temporary sibling and renamed, so an interrupted build starts afresh next time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"
BUILD_TAG = "v1"  # bump when the way a model is built changes, so old caches are not reused
TINY_STEPS = 300
NEVER_TOKEN = "\u0100"  # byte-level BPE's symbol for byte 0x00: absent from the tiny model's training text
QWEN05_SHAPE = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
}
LABELS = {"tiny": "tiny (4x128, int4)", "qwen05": "Qwen2.5-0.5B shape (24x896, int4, random)"}
META = "bench-model.json"


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp)` for a temporary sibling `tmp` of `final`, then rename it to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        build(work / final.name)
        os.replace(work / final.name, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_tiny_hf(out: Path) -> None:
    from trainer.tiny import build_tiny

    build_tiny(out, steps=TINY_STEPS, seed=0, progress=False)


def _qwen05_tokenizer(tiny_hf: Path, vocab_size: int):
    """The tiny model's tokenizer (ChatML template, <|im_end|> as id 2) with filler tokens up to `vocab_size`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from trainer.tiny import CHAT_TEMPLATE, EOT, IM_END

    spec = json.loads((tiny_hf / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = spec["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    while next_id < vocab_size:
        # "\u0120" is byte-level BPE's space: each filler decodes to " tok<N>", and no merge ever produces one.
        vocab[f"\u0120tok{next_id}"] = next_id
        next_id += 1
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token=IM_END,
        pad_token=EOT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=QWEN05_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"padded tokenizer has {len(tokenizer)} ids, not {vocab_size}")
    return tokenizer


def _build_qwen05_hf(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from trainer.tiny import EOT, IM_END

    tokenizer = _qwen05_tokenizer(ensure_hf("tiny"), QWEN05_SHAPE["vocab_size"])
    eos_id, pad_id = tokenizer.convert_tokens_to_ids([IM_END, EOT])
    torch.manual_seed(0)
    config = Qwen2Config(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, **QWEN05_SHAPE)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[eos_id].zero_()  # tied with lm_head: eos never wins greedy decoding
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


HF_BUILDERS: dict[str, Callable[[Path], None]] = {"tiny": _build_tiny_hf, "qwen05": _build_qwen05_hf}


def model_root(name: str) -> Path:
    return CACHE / f"{name}-{BUILD_TAG}"


def ensure_hf(name: str) -> Path:
    """The cached Hugging Face folder of `name`, built first when absent."""
    final = model_root(name) / "hf"
    if not (final / "config.json").is_file():
        started = time.perf_counter()
        _atomic_dir(final, HF_BUILDERS[name])
        (model_root(name) / "hf-build-seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return final


def _unreachable_eos(folder: Path, name: str) -> dict:
    """Make end-of-sequence unreachable in the exported `folder`; return what was done."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if name == "tiny":
        vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        old, new = config["model"]["eos_token_id"], vocab[NEVER_TOKEN]
        config["model"]["eos_token_id"] = new
        path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        return {"eos": f"genai_config eos_token_id {old} -> {new} (byte token for NUL, never generated)"}
    return {"eos": f"eos id {config['model']['eos_token_id']} kept; its tied embedding row is zero, so it never wins"}


def ensure(name: str) -> Path:
    """The cached int4 onnxruntime-genai folder of `name` (built and exported first when absent)."""
    final = model_root(name) / "int4"
    if (final / META).is_file():
        return final
    hf = ensure_hf(name)

    def build(out: Path) -> None:
        from trainer.export import export

        started = time.perf_counter()
        export(hf, out)
        meta = {"name": name, "label": LABELS[name], "export_s": round(time.perf_counter() - started, 1)}
        hf_s = model_root(name) / "hf-build-seconds.txt"
        meta["hf_build_s"] = float(hf_s.read_text()) if hf_s.is_file() else None
        meta.update(_unreachable_eos(out, name))
        (out / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    _atomic_dir(final, build)
    return final


def meta(folder: Path) -> dict:
    """What `ensure` recorded about the model in `folder` (label, build and export seconds, eos handling)."""
    info = json.loads((folder / META).read_text(encoding="utf-8"))
    info["disk_mb"] = round(sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20, 1)
    return info

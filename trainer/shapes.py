"""Random-weight Qwen2 folders with the shape of a real base model, for measuring speed and size, not answers.

Workflow of `build_shaped(out_dir, shape, tokenizer_dir)`: build a Qwen2 config from `shape` (a `Shape`, e.g.
`QWEN25_05B`, the layout of Qwen2.5-0.5B-Instruct), initialise its weights from `seed` (transformers' own init,
so the weights have the magnitudes a trained model starts from), save them in bf16 next to the tokenizer copied
from `tokenizer_dir`, writing into a temporary sibling that is renamed into place. The vocabulary keeps the real
model's size (151936 for Qwen2.5) so that the embedding table and the lm_head weigh what they weigh in the real
model (a quarter of Qwen2.5-0.5B's parameters); the tokenizer only covers its own first ids, so such a model is for
decode speed, time to first token and bytes on disk, never for decoding text.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Shape:
    """The matrix sizes of a Qwen2 decoder."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096  # tokens; the real model has 32768, which only sizes the rotary cache
    tie_word_embeddings: bool = True


# Qwen2.5-0.5B(-Instruct): 494M parameters, 136M of them in the tied embedding / lm_head.
QWEN25_05B = Shape(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, vocab_size=151936)


def build_shaped(out_dir: Path | str, shape: Shape, tokenizer_dir: Path | str, *, seed: int = 0) -> Path:
    """Write a random-weight Qwen2 folder of `shape` with the tokenizer of `tokenizer_dir`; return its path."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    if out.exists():
        raise ConfigError(f"output folder {out} already exists; remove it or pick another")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > shape.vocab_size:
        raise ConfigError(f"the tokenizer of {tokenizer_dir} has {len(tokenizer)} tokens, more than the shape's "
                          f"vocabulary of {shape.vocab_size}")
    config = Qwen2Config(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="bfloat16", **asdict(shape))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        os.replace(work / "model", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out

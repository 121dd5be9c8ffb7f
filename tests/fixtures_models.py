"""Session fixtures with the tiny reference model, built once and reused across test runs.

Load with `pytest_plugins = ["tests.fixtures_models"]`. `tiny_hf` is the Hugging Face folder from
`trainer.tiny.build_tiny` and `tiny_int4` its int4 onnxruntime-genai export with `eval.json`; `slow_int4` is a
wider, deeper model with the tiny tokenizer and random weights, for tests that need an answer to take seconds. Both live under
`$SLMOPS_TEST_CACHE` (default `<repo>/.cache/test-models`) in a folder named by a hash of the trainer's source,
its shipped data, the build settings and the library versions, so a change to any of them builds afresh. Each
folder is built in a temporary sibling and renamed into place, so a half-built folder is never reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "trainer"
TINY_STEPS = 300  # about 40 s on 2 cores; labels right on ~85% of the test split
LIBRARIES = ("torch", "transformers", "tokenizers", "onnxruntime-genai", "onnxruntime")


def _cache_key() -> str:
    digest = hashlib.sha256(f"steps={TINY_STEPS}".encode())
    for lib in LIBRARIES:
        digest.update(f"{lib}={version(lib)}".encode())
    files = sorted([*TRAINER.glob("*.py"), *(p for p in (TRAINER / "data").iterdir() if p.is_file())])
    for path in files:
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cached(name: str, build: Callable[[Path], object]) -> Path:
    """The cached folder `name`, built by `build(path)` into a temporary sibling first when absent."""
    root = Path(os.environ.get("SLMOPS_TEST_CACHE", REPO / ".cache" / "test-models")) / _cache_key()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        build(work / name)
        try:
            os.rename(work / name, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another test process
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def tiny_hf() -> Path:
    """Hugging Face folder of the tiny triage model (Qwen2, ChatML tokenizer)."""
    from trainer.tiny import build_tiny

    return _cached("hf", lambda out: build_tiny(out, steps=TINY_STEPS, seed=0, progress=False))


@pytest.fixture(scope="session")
def tiny_int4(tiny_hf: Path) -> Path:
    """int4 onnxruntime-genai export of `tiny_hf`, with eval.json from the full test split."""
    from trainer.evaluate import write_eval
    from trainer.export import export

    def build(out: Path) -> None:
        export(tiny_hf, out)
        write_eval(out)

    return _cached("int4", build)


SLOW_SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "max_position_embeddings": 4096}


@pytest.fixture(scope="session")
def slow_int4(tiny_hf: Path) -> Path:
    """int4 export of a random-weight model about 25x the tiny one (same tokenizer), with a 4096-token context."""
    from trainer.export import export

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        hf = out.parent / "slow-hf"
        torch.manual_seed(0)
        tiny = Qwen2Config.from_pretrained(tiny_hf)
        config = Qwen2Config(vocab_size=tiny.vocab_size, tie_word_embeddings=True, eos_token_id=tiny.eos_token_id,
                             pad_token_id=tiny.pad_token_id, **SLOW_SHAPE)
        Qwen2ForCausalLM(config).save_pretrained(hf)
        AutoTokenizer.from_pretrained(tiny_hf).save_pretrained(hf)
        export(hf, out, max_length=SLOW_SHAPE["max_position_embeddings"])

    return _cached("slow-int4", build)

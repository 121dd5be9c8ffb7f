"""Session fixtures with the tiny reference model, built once and reused across test runs.

Load with `pytest_plugins = ["tests.fixtures_models"]`. `tiny_hf` is the Hugging Face folder from
`trainer.tiny.build_tiny` and `tiny_int4` its int4 onnxruntime-genai export with `eval.json`. Both live under
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

"""Distillation on the tiny models: stage 1 with a real local teacher (tiny_hf) and a real OpenAI-compatible one
(the slmops agent serving tiny_int4 over HTTP), its cache resumed after a failure, and stage 2 training a much
smaller student for real (text and logits), from Python and from the command line. Refusals one row per case, each
checking that nothing was written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from protocol.errors import ConfigError, TransportError
from trainer.dataset import DataError, Row, Template, encode, reference_rows
from trainer.loop import TrainConfig
from trainer.teacher import HFTeacher, OpenAITeacher, answer_prompts, read_cache, teacher_answers

KEY = "k-0123456789abcdef"
LABELS = r"(ok|warning|fault):"
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 256}


def prompts(n: int, start: int = 0) -> list[Row]:
    return [Row(r.messages, None) for r in reference_rows("train")[start : start + n]]


def write_prompts(path: Path, rows: list[Row]) -> Path:
    path.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in rows), encoding="utf-8")
    return path


def small_model(out: Path, tokenizer) -> Path:  # noqa: ANN001
    """A freshly initialised Qwen2 far smaller than the teacher (a few thousand parameters besides embeddings)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, **SMALL)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def student(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    return small_model(tmp_path_factory.mktemp("student") / "hf", AutoTokenizer.from_pretrained(tiny_hf))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A student whose tokenizer is not the teacher's (trained on other text)."""
    from trainer.tiny import train_tokenizer

    texts = ["an unrelated corpus about gardens, rivers and bread"] * 20
    return small_model(tmp_path_factory.mktemp("stranger") / "hf", train_tokenizer(texts))


@pytest.fixture(scope="module")
def teacher(tiny_hf: Path) -> HFTeacher:
    return HFTeacher(tiny_hf, batch_size=4)


@pytest.fixture(scope="module")
def agent(tiny_int4: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The real slmops agent serving tiny_int4 on a loopback port: an OpenAI-compatible teacher."""
    from tests.agent.test_serving import Server

    server = Server(Path(tiny_int4), tmp_path_factory.mktemp("agent"), "--api-key", KEY, name="triage")
    yield server
    server.close()


def cache_lines(cache: Path) -> list[dict]:
    return [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]


# -- refusals ------------------------------------------------------------------------------------------------------
def _refused_port() -> str:
    from tests.net import free_port

    return f"http://127.0.0.1:{free_port()}/v1"


CASES = {  # id: (run_distill keyword arguments, DistillConfig changes, error, message)
    "teacher-url-refusing": (lambda c: {"teacher_url": _refused_port(), "teacher_model": "triage"}, {},
                             ConfigError, "cannot reach the teacher"),
    "teacher-wrong-api-key": (lambda c: {"teacher_url": c.url(), "teacher_model": "triage", "api_key": "wrong-0123"},
                              {}, ConfigError, "refused the API key"),
    "teacher-unknown-model": (lambda c: {"teacher_url": c.url(), "teacher_model": "llama3", "api_key": KEY}, {},
                              ConfigError, "404"),
    "teacher-url-not-http": (lambda c: {"teacher_url": "file:///etc/passwd", "teacher_model": "triage"}, {},
                             ConfigError, "must be http"),
    "logits-different-tokenizers": (lambda c: {"teacher": c.tiny_hf, "student": c.stranger}, {"mode": "logits"},
                                    ConfigError, "share a tokenizer"),
    "logits-with-endpoint-teacher": (lambda c: {"teacher_url": _refused_port(), "teacher_model": "triage"},
                                     {"mode": "logits"}, ConfigError, "local Hugging Face teacher"),
    "bad-prompt-file": (lambda c: {"teacher": c.tiny_hf, "prompts": c.bad_prompts()}, {}, DataError, "line 2"),
    "non-empty-out": (lambda c: {"teacher": c.tiny_hf}, {}, ConfigError, "not an empty folder"),
    "student-not-a-model": (lambda c: {"teacher": c.tiny_hf, "student": c.tmp}, {}, ConfigError, "config.json"),
    "samples-at-temperature-0": (lambda c: {"teacher": c.tiny_hf}, {"samples": 2}, ConfigError, "temperature"),
    "neither-teacher": (lambda c: {}, {}, ConfigError, "either a teacher folder"),
    "cuda-asked-but-absent": (lambda c: {"teacher_url": _refused_port(), "teacher_model": "triage"},
                              {"train": TrainConfig(max_steps=1, device="cuda")}, ConfigError, "no CUDA device"),
}


class Ctx:
    def __init__(self, request: pytest.FixtureRequest, tmp: Path, tiny_hf: Path, stranger: Path) -> None:
        self.request, self.tmp, self.tiny_hf, self.stranger = request, tmp, tiny_hf, stranger

    def url(self) -> str:
        return f"{self.request.getfixturevalue('agent').url}/v1"

    def bad_prompts(self) -> Path:
        path = self.tmp / "bad.jsonl"
        path.write_text('{"prompt": "fine"}\n{"prompt": "x", "extra": 1}\n', encoding="utf-8")
        return path


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_refusals_leave_nothing_behind(case: str, request: pytest.FixtureRequest, tmp_path: Path, tiny_hf: Path,
                                       student: Path, stranger: Path) -> None:
    import torch

    from trainer.distill import DistillConfig, run_distill

    if case == "cuda-asked-but-absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make, changes, error, message = CASES[case]
    out, cache = tmp_path / "out", tmp_path / "cache.jsonl"
    if case == "non-empty-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    kwargs = {"student": student, "prompts": write_prompts(tmp_path / "p.jsonl", prompts(3)), **make(
        Ctx(request, tmp_path, tiny_hf, stranger))}
    cfg = DistillConfig(**{"train": TrainConfig(max_steps=1), **changes})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=message):
        run_distill(kwargs.pop("student"), kwargs.pop("prompts"), out, cfg, cache=cache, progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache, no out, no work folder
    if case == "non-empty-out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


# -- stage 1 -------------------------------------------------------------------------------------------------------
class Flaky:
    """A real teacher that fails after `ok` batches (a killed run), counting the rows it answered."""

    def __init__(self, inner: HFTeacher, ok: int | None = None) -> None:
        self.inner, self.ok, self.rows = inner, ok, 0
        self.name, self.identity, self.batch_size = inner.name, inner.identity, inner.batch_size

    def answer(self, rows, **kw):  # noqa: ANN001, ANN003, ANN201
        if self.ok is not None and self.ok <= 0:
            raise TransportError("the teacher went away")
        self.ok = None if self.ok is None else self.ok - 1
        self.rows += len(rows)
        return self.inner.answer(rows, **kw)


def test_an_interrupted_run_resumes_from_the_cache_and_answers_only_the_rest(teacher: HFTeacher,
                                                                               tmp_path: Path) -> None:
    rows, cache = prompts(8), tmp_path / "cache.jsonl"
    opts = {"samples": 2, "temperature": 1.0, "max_new_tokens": 10, "progress": False}
    first = Flaky(teacher, ok=3)
    with pytest.raises(TransportError):
        teacher_answers(rows, first, cache, **opts)
    assert first.rows == 12 and len(cache_lines(cache)) == 12  # three batches of 4, each written as it came
    with cache.open("ab") as f:
        f.write(b'{"run":"' + cache_lines(cache)[0]["run"].encode() + b'","prompt":"ab')  # killed mid-line

    second = Flaky(teacher)
    again = answer_prompts(rows, second, cache, **opts)
    assert (again.cached, again.answered, second.rows) == (12, 4, 4)
    lines = cache_lines(cache)  # the cut line is gone and each (prompt, sample) is there once
    assert sorted((x["prompt"], x["sample"]) for x in lines) == sorted((r.key(), s) for r in rows for s in (0, 1))

    # samples=2: two rows per prompt, in prompt order; seeded per prompt and sample, so an uninterrupted run in
    # other batches gives the same answers, and the two samples are not all the same
    assert [r.messages for r in again.rows] == [r.messages for r in rows for _ in (0, 1)]
    fresh = teacher_answers(rows, teacher, tmp_path / "fresh.jsonl", **opts)
    assert [r.answer for r in fresh] == [r.answer for r in again.rows]
    assert any(a.answer != b.answer for a, b in zip(fresh[::2], fresh[1::2], strict=True))
    third = Flaky(teacher)
    assert teacher_answers(rows, third, cache, **opts) == again.rows and third.rows == 0


def test_temperature_zero_gives_the_same_answers_twice_and_labels_come_from_the_answers(teacher: HFTeacher,
                                                                                        tmp_path: Path) -> None:
    rows = prompts(6, start=100)
    runs = [teacher_answers(rows, teacher, tmp_path / f"c{i}.jsonl", temperature=0, max_new_tokens=20,
                            label_regex=LABELS, progress=False) for i in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == len(rows)
    assert all(r.label == r.answer.split(":")[0] for r in runs[0] if r.label)
    assert sum(r.label in ("ok", "warning", "fault") for r in runs[0]) >= 5
    other = read_cache(tmp_path / "c0.jsonl", "another-run")
    assert other == {}  # lines of one run are not answers of another (digest of teacher and sampling)


def test_an_openai_compatible_teacher_answers_over_http_and_a_rerun_asks_nothing(agent, tmp_path: Path) -> None:
    rows, cache, sent = prompts(5, start=200), tmp_path / "cache.jsonl", []
    client = httpx.Client(timeout=30, event_hooks={"request": [sent.append]})
    oai = OpenAITeacher(f"{agent.url}/v1", "triage", api_key=KEY, client=client)
    got = teacher_answers(rows, oai, cache, samples=2, temperature=0.7, max_new_tokens=24, label_regex=LABELS,
                          progress=False)
    assert len(got) == 10 and len(sent) == 10 and all(r.answer for r in got)
    assert sum(r.label is not None for r in got) >= 8
    body = json.loads(sent[0].content)
    assert body["model"] == "triage" and body["temperature"] == 0.7 and isinstance(body["seed"], int)
    assert teacher_answers(rows, oai, cache, samples=2, temperature=0.7, max_new_tokens=24, label_regex=LABELS,
                           progress=False) == got and len(sent) == 10
    client.close()


def _scripted(replies: list[httpx.Response], sleeps: list[float], **kw) -> tuple[OpenAITeacher, list]:  # noqa: ANN003
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return replies[min(len(seen), len(replies)) - 1]

    client = httpx.Client(transport=httpx.MockTransport(handler))
    return OpenAITeacher("http://teacher.test/v1", "m", client=client, sleep=sleeps.append, **kw), seen


OK = httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": " ok: nothing \n"}}]})


def test_busy_and_failing_endpoints_are_retried_with_backoff_honouring_retry_after() -> None:
    sleeps: list[float] = []
    oai, seen = _scripted([httpx.Response(429, headers={"retry-after": "0.25"}), httpx.Response(503), OK], sleeps)
    assert oai.answer(prompts(1), temperature=0, max_new_tokens=8, seed=0) == ["ok: nothing"]
    assert len(seen) == 3 and sleeps == [0.25, 1.0]

    sleeps.clear()
    oai, seen = _scripted([httpx.Response(502, json={"error": {"message": "upstream down"}})], sleeps, retries=2)
    with pytest.raises(TransportError, match="upstream down"):
        oai.answer(prompts(1), temperature=0, max_new_tokens=8, seed=0)
    assert len(seen) == 3 and sleeps == [0.5, 1.0]

    oai, seen = _scripted([httpx.Response(401)], sleeps)
    with pytest.raises(ConfigError, match="API key"):
        oai.answer(prompts(1), temperature=0, max_new_tokens=8, seed=0)
    assert len(seen) == 1  # not retried

    oai, _ = _scripted([httpx.Response(200, content=b"x" * (5 * 1024**2))], sleeps)
    with pytest.raises(ConfigError, match="more than"):
        oai.answer(prompts(1), temperature=0, max_new_tokens=8, seed=0)


# -- stage 2 -------------------------------------------------------------------------------------------------------
def answer_loss(model_dir: Path, rows: list[Row]) -> float:
    """Mean cross-entropy of a model on the answer tokens of `rows`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    losses = []
    with torch.no_grad():
        for row in rows:
            ids, start = encode(tok, row, Template())
            labels = torch.tensor([[-100] * start + ids[start:]])
            losses.append(model(input_ids=torch.tensor([ids]), labels=labels).loss.item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def answered(teacher: HFTeacher, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Row], Path]:
    """Stage 1 done once for the stage 2 tests: 16 prompts and the cache holding the teacher's answers."""
    rows, cache = prompts(16, start=300), tmp_path_factory.mktemp("stage1") / "cache.jsonl"
    teacher_answers(rows, teacher, cache, max_new_tokens=20, progress=False)
    return rows, cache


@pytest.mark.parametrize(("mode", "method", "lr", "drop"), [("text", "lora", 5e-2, 0.1), ("logits", "full", 2e-2, 0.5)],
                         ids=["text-lora", "logits-full"])  # LoRA moves a random 32-wide model less than full training
def test_stage_two_trains_the_student_on_the_teachers_answers(mode: str, method: str, lr: float, drop: float,
                                                              teacher: HFTeacher, student: Path, answered,
                                                              tmp_path: Path) -> None:
    from trainer.distill import DistillConfig, distill

    (rows, stage1), out, cache = answered, tmp_path / "out", tmp_path / "cache.jsonl"
    shutil.copy(stage1, cache)
    cfg = DistillConfig(mode=mode, method=method, max_new_tokens=20, val=0.25, rank=8, lora_alpha=16,
                        train=TrainConfig(max_steps=12, batch_size=8, lr=lr, warmup=0.0, eval_every=6))
    result = distill(student, teacher, rows, out, cfg, cache=cache, progress=False)
    synthetic = teacher_answers(rows, teacher, cache, max_new_tokens=20, progress=False)
    before, after = answer_loss(student, synthetic), answer_loss(result.merged, synthetic)
    assert after < before - drop, (before, after)
    assert (result.cached, result.answered) == (16, 0) and len(cache_lines(cache)) == 16
    assert result.train.steps == 12 and math.isfinite(result.train.train_loss)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["merged", "distill.json", "synthetic.jsonl", *(["adapter"] if method == "lora" else [])])
    summary = json.loads((out / "distill.json").read_text())
    assert summary["config"]["mode"] == mode and summary["stage1"]["cached"] == 16
    assert summary["cache"]["run"] == result.run and not (tmp_path / ".out.distill").exists()


def test_kd_loss_is_zero_against_itself_and_the_text_loss_at_alpha_zero(student: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.dataset import collate
    from trainer.distill import kd_loss

    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    rows = [Row(r.messages, r.answer) for r in reference_rows("train")[:3]]
    ids, mask, labels = collate([encode(tok, r, Template()) for r in rows], tok.pad_token_id)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        text = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        assert kd_loss(model, temperature=2.0, alpha=1.0, vocab=len(tok))(model, batch).item() == pytest.approx(
            0.0, abs=1e-5)
        assert kd_loss(model, temperature=2.0, alpha=0.0, vocab=len(tok))(model, batch).item() == pytest.approx(
            text, rel=1e-4)
        torch.manual_seed(1)
        other = AutoModelForCausalLM.from_config(model.config).eval()
        assert kd_loss(other, temperature=2.0, alpha=1.0, vocab=len(tok))(model, batch).item() > 0.01


# -- command line --------------------------------------------------------------------------------------------------
def test_the_command_line_distils_end_to_end_and_reuses_the_cache(tiny_hf: Path, student: Path,
                                                                  tmp_path: Path) -> None:
    from trainer.cli import app

    runner, cache = CliRunner(), tmp_path / "cache.jsonl"
    file = write_prompts(tmp_path / "prompts.jsonl", prompts(6, start=400))
    args = ["distill", "--student", str(student), "--teacher", str(tiny_hf), "--prompts", str(file),
            "--cache", str(cache), "--max-new-tokens", "16", "--steps", "2", "--batch-size", "4", "--method", "full",
            "--label-regex", LABELS]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "0 from the cache, 6 new" in first.output and (tmp_path / "a" / "merged" / "config.json").is_file()
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert second.exit_code == 0 and "6 from the cache, 0 new" in second.output
    assert len(cache_lines(cache)) == 6
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert refused.exit_code == 2 and "error:" in refused.output and "not an empty folder" in refused.output
    both = runner.invoke(app, [*args, "--teacher-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "c")])
    assert both.exit_code == 2 and not (tmp_path / "c").exists()


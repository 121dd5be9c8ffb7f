"""The tiny reference model folder: tokenizer, chat template, config and greedy answers in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.task import ANSWER_RE, load_split
from trainer.tiny import EOT, IM_END, IM_START, chatml_prompt

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(tiny_hf: Path):
    return transformers.AutoTokenizer.from_pretrained(tiny_hf)


def test_tokenizer_round_trips_prompts_answers_and_prose(tokenizer) -> None:
    texts = [r["prompt"] for r in load_split("test")[:50]] + [r["answer"] for r in load_split("test")[:50]]
    texts += ["Firmware 2.3.1 rolled back: checksum mismatch!", "ünïcode °C ✓ and\ttabs\nnewlines"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids_and_eos_ends_a_turn(tokenizer, tiny_hf: Path) -> None:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (EOT, IM_START, IM_END)]
    assert len(set(ids)) == 3 and all(isinstance(i, int) and i < 3 for i in ids)
    assert tokenizer.encode(f"{IM_START}user{IM_END}", add_special_tokens=False)[0] == ids[1]
    assert tokenizer.eos_token == IM_END
    generation = json.loads((tiny_hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids[2]


def test_chat_template_renders_chatml(tokenizer) -> None:
    messages = [{"role": "user", "content": "2026-03-02T10:14:07Z pump-17 temp=92.4C"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\n2026-03-02T10:14:07Z pump-17 temp=92.4C<|im_end|>\n<|im_start|>assistant\n"
    assert rendered == chatml_prompt(messages[0]["content"])


def test_config_is_small_qwen2_with_int4_friendly_sizes(tiny_hf: Path) -> None:
    config = json.loads((tiny_hf / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"]
    for key in ("hidden_size", "intermediate_size"):
        assert config[key] % 32 == 0, key
    assert config["hidden_size"] % config["num_attention_heads"] == 0
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0


def test_greedy_answers_follow_the_format(tiny_hf: Path, tokenizer) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf)
    for row in load_split("test")[:5]:
        ids = tokenizer(chatml_prompt(row["prompt"]), return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert ANSWER_RE.match(answer), answer


def test_teacher_and_corpus_only_student_share_the_tokenizer_and_the_student_has_under_a_quarter(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.tiny import build_tiny

    teacher = build_tiny(tmp_path / "teacher", steps=1, shape="teacher", progress=False)
    student = build_tiny(tmp_path / "student", steps=1, task=False, progress=False)
    assert (teacher / "tokenizer.json").read_bytes() == (student / "tokenizer.json").read_bytes()
    sizes = [sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d).parameters()) for d in (teacher, student)]
    assert sizes[1] <= sizes[0] / 4, sizes
    with pytest.raises(ValueError, match="shape"):
        build_tiny(tmp_path / "other", steps=1, shape="huge", progress=False)
    assert not (tmp_path / "other").exists()


def test_corpus_only_training_never_sees_a_labelled_answer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import trainer.tiny as tiny

    seen: list[int] = []
    real = tiny._train

    def spy(model, examples, blocks, **kw):
        seen.append(len(examples))
        return real(model, examples, blocks, **kw)

    monkeypatch.setattr(tiny, "_train", spy)
    tiny.build_tiny(tmp_path / "a", steps=1, task=False, progress=False)
    tiny.build_tiny(tmp_path / "b", steps=1, progress=False)
    assert seen == [0, 3000]

"""Export to onnxruntime-genai: the int4 folder loads, answers in format, and bad inputs raise ConfigError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from protocol.errors import ConfigError
from trainer.evaluate import chat_prompt, generate, load
from trainer.export import builder_command, export
from trainer.task import ANSWER_RE, load_split
from trainer.tiny import chatml_prompt

og = pytest.importorskip("onnxruntime_genai")
onnx = pytest.importorskip("onnx")


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_int4_export_loads_and_answers_label_colon_action(tiny_int4: Path) -> None:
    model, tokenizer = load(tiny_int4)
    for row in load_split("test")[:10]:
        out = generate(model, tokenizer, chat_prompt(tokenizer, row["prompt"]))
        assert ANSWER_RE.match(out.text), out.text
        assert 0 < out.new_tokens < 32


def test_og_tokenizer_matches_transformers_and_applies_the_chatml_template(tiny_hf: Path, tiny_int4: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_hf)
    tokenizer = og.Tokenizer(og.Model(str(tiny_int4)))
    prompt = load_split("test")[0]["prompt"]
    text = chatml_prompt(prompt)
    assert chat_prompt(tokenizer, prompt) == text
    assert list(tokenizer.encode(text)) == hf.encode(text, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode(prompt)) == prompt


def test_genai_config_and_quantization_options(tiny_int4: Path) -> None:
    config = json.loads((tiny_int4 / "genai_config.json").read_text())
    assert config["search"]["max_length"] == config["model"]["context_length"] == 512
    graph = onnx.load(str(tiny_int4 / "model.onnx"), load_external_data=False).graph
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert nbits, "no int4 MatMulNBits in the graph"
    for node in nbits:
        attrs = _attrs(node)
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4), node.name


def test_builder_command_uses_unprefixed_int4_options(tmp_path: Path) -> None:
    cmd = builder_command(tmp_path / "in", tmp_path / "out", tmp_path / "cache", "int4", 64, 2)
    assert cmd[1:3] == ["-m", "onnxruntime_genai.models.builder"]
    assert cmd[cmd.index("-p") + 1] == "int4" and cmd[cmd.index("-e") + 1] == "cpu"
    assert cmd[cmd.index("--extra_options") + 1 :] == ["accuracy_level=2", "block_size=64"]
    assert "--extra_options" not in builder_command(tmp_path, tmp_path, tmp_path, "fp32", 32, 4)


def _random_folder(kind: str, tiny_hf: Path, out: Path) -> Path:
    """A randomly initialised Llama or Phi-3 folder with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}[kind]
    shape = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = config_cls(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
        **({"original_max_position_embeddings": 128} if kind == "phi3" else {}),
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("kind", "precision", "block_size", "accuracy_level"),
    [("llama", "int4", 64, 1), ("phi3", "fp32", 32, 4)],
)
def test_export_of_other_architectures_with_options(
    tiny_hf: Path, tmp_path: Path, kind: str, precision: str, block_size: int, accuracy_level: int
) -> None:
    src = _random_folder(kind, tiny_hf, tmp_path / kind)
    options = {"precision": precision, "block_size": block_size, "accuracy_level": accuracy_level}
    out = export(src, tmp_path / "onnx", max_length=4096, **options)
    assert json.loads((out / "genai_config.json").read_text())["search"]["max_length"] == 128
    assert (out / "chat_template.jinja").is_file()
    assert not list(tmp_path.glob(".onnx.partial-*")), "temporary folder left behind"
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [_attrs(node) for node in graph.node if node.op_type == "MatMulNBits"]
    if precision == "fp32":
        assert not nbits
    else:
        assert nbits and all((a["block_size"], a["accuracy_level"]) == (block_size, accuracy_level) for a in nbits)
    model, tokenizer = load(out)
    assert generate(model, tokenizer, chat_prompt(tokenizer, "hi"), max_new_tokens=3).new_tokens <= 3


def test_missing_folder_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        export(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "not a Hugging Face model folder"),
        ({"config.json": "{}"}, "no model_type"),
        ({"config.json": '{"model_type": "qwen2"}'}, "no weights"),
        ({"config.json": '{"model_type": "qwen2"}', "model.safetensors": "x"}, "no tokenizer"),
    ],
)
def test_not_a_model_folder_raises_config_error(tmp_path: Path, files: dict[str, str], message: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        export(src, tmp_path / "out")


def test_bad_options_and_busy_output_raise_config_error(tiny_hf: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="precision"):
        export(tiny_hf, tmp_path / "a", precision="int3")
    with pytest.raises(ConfigError, match="block size"):
        export(tiny_hf, tmp_path / "a", block_size=48)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export(tiny_hf, busy)
    assert (busy / "keep.txt").read_text() == "mine"


def test_builder_failure_raises_config_error_and_keeps_its_log(tiny_hf: Path, tmp_path: Path) -> None:
    src = tmp_path / "broken"
    shutil.copytree(tiny_hf, src)
    (src / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="builder could not export") as caught:
        export(src, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert (tmp_path / "out.builder.log").read_text()
    assert not (tmp_path / "out").exists()

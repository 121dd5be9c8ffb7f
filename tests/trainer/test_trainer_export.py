"""Export to onnxruntime-genai: the int4 folder loads, answers in format, and bad inputs raise ConfigError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from protocol.errors import ConfigError
from trainer.evaluate import chat_prompt, generate, load
from trainer.export import (
    DEFAULT_ACCURACY_LEVEL,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_KEEP_FLOAT,
    DEFAULT_KEEP_INT8,
    EXPORT_FILE,
    builder_command,
    export,
    resolve_settings,
    weight_bytes,
)
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
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (
            4, DEFAULT_BLOCK_SIZE, DEFAULT_ACCURACY_LEVEL), node.name


def test_builder_command_uses_unprefixed_option_names(tmp_path: Path) -> None:
    settings = resolve_settings("int4", "cpu", 64, 2, ("lm_head",), ("sensitive",))
    cmd = builder_command(tmp_path / "in", tmp_path / "out", tmp_path / "cache", settings)
    assert cmd[1:3] == ["-m", "onnxruntime_genai.models.builder"]
    assert cmd[cmd.index("-p") + 1] == "int4" and cmd[cmd.index("-e") + 1] == "cpu"
    assert cmd[cmd.index("--extra_options") + 1 :] == [
        "accuracy_level=2", "block_size=64", "nodes_to_exclude=/lm_head/MatMul",
        "matmul_mixed_precision=mixed_layers:int8",
    ]
    fp32 = builder_command(tmp_path, tmp_path, tmp_path, resolve_settings("fp32"))
    assert "--extra_options" not in fp32
    tied = builder_command(tmp_path, tmp_path, tmp_path, resolve_settings("int4", keep_int8=["lm_head"]), tied=True)
    assert tied[-3:] == ["shared_embeddings=false", "op_types_to_quantize=MatMul/Gather",
                         "matmul_mixed_precision=last_matmul:int8"]
    cuda = resolve_settings("fp16", "cuda", cuda=lambda: True)
    cmd = builder_command(tmp_path, tmp_path, tmp_path, cuda)
    assert (cmd[cmd.index("-p") + 1], cmd[cmd.index("-e") + 1]) == ("fp16", "cuda") and "--extra_options" not in cmd
    assert cuda.accuracy_level == 0 and resolve_settings("int4", "cuda", cuda=lambda: True).accuracy_level == 0


def test_int4_defaults_are_the_measured_ones() -> None:
    settings = resolve_settings()
    assert (settings.block_size, settings.accuracy_level) == (DEFAULT_BLOCK_SIZE, DEFAULT_ACCURACY_LEVEL)
    assert (settings.keep_float, settings.keep_int8) == (DEFAULT_KEEP_FLOAT, DEFAULT_KEEP_INT8)
    assert resolve_settings("int8").keep_float == ()


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


def test_builder_failure_raises_config_error_and_keeps_its_log(tiny_hf: Path, tmp_path: Path) -> None:
    src = tmp_path / "broken"
    shutil.copytree(tiny_hf, src)
    (src / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="builder could not export") as caught:
        export(src, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert (tmp_path / "out.builder.log").read_text()
    assert not (tmp_path / "out").exists()


# --- precisions, kept layers, refusals -------------------------------------------------------------------------


def _nodes(folder: Path) -> dict[str, tuple[str, dict]]:
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return {node.name: (node.op_type, _attrs(node)) for node in graph.node}


def _answers(folder: Path, rows: int = 5) -> list[str]:
    model, tokenizer = load(folder)
    return [generate(model, tokenizer, chat_prompt(tokenizer, r["prompt"])).text for r in load_split("test")[:rows]]


@pytest.fixture(scope="module")
def tiny_fp32(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tiny_hf, tmp_path_factory.mktemp("fp32") / "onnx", precision="fp32")


def test_fp32_export_answers_and_int4_is_under_30_percent_of_its_bytes(tiny_fp32: Path, tiny_int4: Path) -> None:
    assert all(ANSWER_RE.match(text) for text in _answers(tiny_fp32)), _answers(tiny_fp32)
    assert not [n for n, (op, _) in _nodes(tiny_fp32).items() if op in ("MatMulNBits", "GatherBlockQuantized")]
    record = json.loads((tiny_fp32 / EXPORT_FILE).read_text())
    assert record["precision"] == "fp32" and "block_size" not in record
    assert record["weight_bytes"] == weight_bytes(tiny_fp32)
    assert weight_bytes(tiny_int4) <= 0.30 * weight_bytes(tiny_fp32), (weight_bytes(tiny_int4), record)


def test_int8_export_quantizes_matmuls_to_8_bits_and_answers(tiny_hf: Path, tiny_fp32: Path, tmp_path: Path) -> None:
    out = export(tiny_hf, tmp_path / "int8", precision="int8", block_size=64)
    nbits = [a for op, a in _nodes(out).values() if op == "MatMulNBits"]
    assert nbits and all((a["bits"], a["block_size"], a["accuracy_level"]) == (8, 64, 4) for a in nbits)
    assert all(ANSWER_RE.match(text) for text in _answers(out))
    assert weight_bytes(out) < 0.6 * weight_bytes(tiny_fp32)
    assert json.loads((out / EXPORT_FILE).read_text())["block_size"] == 64


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "lm_head", "embedding_op"),
    [
        ({"keep_float": ("lm_head", "embeddings")}, ("MatMul", None), "Gather"),
        ({"keep_int8": ("lm_head",)}, ("MatMulNBits", 8), "GatherBlockQuantized"),
    ],
    ids=["float-lm_head-and-embeddings", "int8-lm_head"],
)
def test_int4_keeps_the_named_layers_at_higher_precision(
    tiny_hf: Path, tmp_path: Path, options: dict, lm_head: tuple, embedding_op: str
) -> None:
    out = export(tiny_hf, tmp_path / "onnx", **options)
    nodes = _nodes(out)
    head = next((op, a.get("bits")) for name, (op, a) in nodes.items() if name.startswith("/lm_head/MatMul"))
    assert head == lm_head
    assert any(name.startswith("/model/embed_tokens/") and op == embedding_op for name, (op, _) in nodes.items())
    body = [a["bits"] for name, (op, a) in nodes.items() if op == "MatMulNBits" and name.startswith("/model/layers")]
    assert body and set(body) == {4}
    assert all(ANSWER_RE.match(text) for text in _answers(out))


def _adapter_config(**changes: object) -> dict:
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    return {**config, **changes}


REFUSALS = [
    ("precision-int3", {"precision": "int3"}, None, "precision must be one of"),
    ("provider-dml", {"execution_provider": "dml"}, None, "execution provider must be one of"),
    ("fp16-on-cpu", {"precision": "fp16"}, None, "fp16 exports run on cuda only"),
    ("cuda-absent", {"execution_provider": "cuda"}, None, "needs onnxruntime-genai with CUDA"),
    ("block-size-48", {"block_size": 48}, None, "block size must be one of"),
    ("accuracy-level-5", {"accuracy_level": 5}, None, "accuracy level must be one of"),
    ("keep-float-unknown", {"keep_float": ["attention"]}, None, "keep-float takes lm_head, embeddings"),
    ("keep-int8-unknown", {"keep_int8": ["embeddings"]}, None, "keep-int8 takes lm_head, sensitive"),
    ("keep-float-on-fp32", {"precision": "fp32", "keep_float": ["lm_head"]}, None, "not of fp32"),
    ("keep-int8-on-int8", {"precision": "int8", "keep_int8": ["lm_head"]}, None, "int8 export has them"),
    ("embeddings-on-int8", {"precision": "int8", "keep_float": ["embeddings"]}, None, "int4 exports only"),
    ("lm_head-twice", {"keep_float": ["lm_head"], "keep_int8": ["lm_head"]}, None, "both in float and in int8"),
    ("adapter-missing", {}, "missing", "adapter folder .* does not exist"),
    ("adapter-not-lora", {}, _adapter_config(peft_type="PREFIX_TUNING"), "not a LoRA adapter"),
    ("adapter-dora", {}, _adapter_config(use_dora=True), "DoRA"),
    ("adapter-modules-to-save", {}, _adapter_config(modules_to_save=["lm_head"]), "modules_to_save"),
    ("adapter-rank-0", {}, _adapter_config(r=0), "rank r must be"),
    ("adapter-unknown-target", {}, _adapter_config(target_modules=["embed_tokens"]), "cannot export LoRA on"),
    ("adapter-target-regex", {}, _adapter_config(target_modules=".*proj"), "must be a list"),
    ("adapter-no-weights", {}, "no-weights", "holds no adapter weights"),
    ("adapter-bad-name", {"adapter_name": "../up"}, _adapter_config(), "adapter name"),
]


@pytest.mark.parametrize(("options", "adapter", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_raise_config_error_and_write_nothing(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict, adapter: object, message: str
) -> None:
    monkeypatch.setattr("trainer.export.cuda_available", lambda: False)
    if adapter is not None:
        folder = tmp_path / "adapter"
        if adapter != "missing":
            folder.mkdir()
            config = _adapter_config() if adapter == "no-weights" else adapter
            (folder / "adapter_config.json").write_text(json.dumps(config))
            if adapter != "no-weights":
                (folder / "adapter_model.safetensors").write_bytes(b"unused")
        options = {**options, "adapter": folder}
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=message) as caught:
        export(tiny_hf, tmp_path / "out", **options)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"


def test_busy_output_is_refused_and_left_alone(tiny_hf: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export(tiny_hf, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"


# --- LoRA adapters ---------------------------------------------------------------------------------------------

PROMPT = "kernel: disk /dev/sda1 read error"


@pytest.fixture(scope="module")
def lora_dir(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 PEFT LoRA adapter over tiny_hf (PEFT's default targets for Qwen2) with random nonzero B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_hf),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.05)
    out = tmp_path_factory.mktemp("lora") / "triage-v1"
    model.save_pretrained(out)
    return out


def _torch_logits(tiny_hf: Path, lora: Path | None, ids: list[int]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf)
    if lora is not None:
        model = PeftModel.from_pretrained(model, lora)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()


def _og_logits(folder: Path, adapter: str | None):
    import numpy as np

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = list(tokenizer.encode(chat_prompt(tokenizer, PROMPT)))
    adapters = og.Adapters(model)
    if adapter is not None:
        adapters.load(str(folder / f"{adapter}.onnx_adapter"), adapter)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 2)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(ids)
    return ids, np.asarray(generator.get_logits())[0, -1]


def test_lora_adapter_exports_as_onnx_adapter_and_matches_peft(tiny_hf: Path, lora_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    out = export(tiny_hf, tmp_path / "onnx", precision="fp32", adapter=lora_dir)
    adapter = out / "triage-v1.onnx_adapter"
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["adapter"] == {"file": adapter.name, "rank": 8, "targets": ["q_proj", "v_proj"],
                                 "bytes": adapter.stat().st_size}
    base_bytes = (tiny_hf / "model.safetensors").stat().st_size
    assert adapter.stat().st_size <= 0.05 * base_bytes, (adapter.stat().st_size, base_bytes)

    ids, plain = _og_logits(out, None)
    _, adapted = _og_logits(out, "triage-v1")
    assert np.abs(adapted - plain).max() > 0.05, "the adapter does not change the logits"
    np.testing.assert_allclose(plain, _torch_logits(tiny_hf, None, ids), atol=2e-3)
    np.testing.assert_allclose(adapted, _torch_logits(tiny_hf, lora_dir, ids), atol=2e-3)


@pytest.mark.slow
def test_lora_adapter_over_an_int4_base_keeps_the_lora_weights_in_float(
    tiny_hf: Path, lora_dir: Path, tmp_path: Path
) -> None:
    import numpy as np

    out = export(tiny_hf, tmp_path / "onnx", adapter=lora_dir, adapter_name="triage")
    nodes = _nodes(out)
    lora = {name: op for name, (op, _) in nodes.items() if "/lora_" in name}
    assert len(lora) == 2 * 2 * 4 and set(lora.values()) == {"MatMul"}, lora
    assert any(op == "MatMulNBits" for op, _ in nodes.values())
    _, plain = _og_logits(out, None)
    _, adapted = _og_logits(out, "triage")
    assert np.abs(adapted - plain).max() > 0.05
    assert (out / "triage.onnx_adapter").stat().st_size <= 0.05 * (tiny_hf / "model.safetensors").stat().st_size


# --- command line ----------------------------------------------------------------------------------------------


def test_cli_export_takes_every_option(tiny_hf: Path, lora_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trainer.cli import app

    out = tmp_path / "onnx"
    args = ["export", "--model", str(tiny_hf), "--out", str(out), "--precision", "int4", "--provider", "cpu",
            "--block-size", "64", "--accuracy-level", "1", "--keep-float", "lm_head", "--keep-float", "embeddings",
            "--adapter", str(lora_dir), "--adapter-name", "triage"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "triage.onnx_adapter" in result.output
    record = json.loads((out / EXPORT_FILE).read_text())
    assert (record["block_size"], record["accuracy_level"], record["keep_float"]) == (64, 1, ["embeddings", "lm_head"])
    nbits = [a for op, a in _nodes(out).values() if op == "MatMulNBits"]
    assert nbits and all((a["block_size"], a["accuracy_level"]) == (64, 1) for a in nbits)


def test_cli_refusal_is_one_red_line_and_exit_2(tiny_hf: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trainer.cli import app

    result = CliRunner().invoke(app, ["export", "--model", str(tiny_hf), "--out", str(tmp_path / "o"),
                                      "--precision", "fp16"])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "fp16 exports run on cuda only" in result.output
    assert not (tmp_path / "o").exists()

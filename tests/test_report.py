"""The report card reads what the stages leave behind and renders every section, the summary table and plots."""

import json

from nanochat.evals import report


def _write_stage(root, stage, losses, evals):
    folder = root / "checkpoints" / stage / "d2"
    (folder / "step_000004").mkdir(parents=True)
    (folder / "step_000004" / "meta.json").write_text(json.dumps({"config": {"n_layer": 2}, "step": 4}))
    with open(folder / "train_log.jsonl", "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"step": i, "loss": loss, "lr": 1.0, "tok_per_s": 1000.0 + i}) + "\n")
        f.write(json.dumps({"step": len(losses), "val_bpb": 2.5}) + "\n")
        f.write('{"step": 9, "loss": 1.0')  # a line torn by a kill is ignored
    (folder / f"{stage}_eval.json").write_text(json.dumps(evals))


def test_report_has_every_section_table_and_plot(base_dir):
    report.mark_start()
    (base_dir / "tokenizer").mkdir()
    (base_dir / "tokenizer" / "tok_train.json").write_text(json.dumps({"vocab_size": 512, "seconds": 1.5}))
    _write_stage(base_dir, "base", [5.0, 4.0, 3.0], {"bpb": {"train": 2.4, "val": 2.5},
                                                    "core": {"name": "CORE-offline (14/22 tasks)", "core": 0.11}})
    _write_stage(base_dir, "sft", [2.0, 1.5], {"summary": {"ARC-Easy": 0.31, "GSM8K": 0.02, "ChatCORE": 0.05},
                                          "tasks": {"ARC-Easy": {"accuracy": 0.31, "n": 40}}, "chatcore": 0.05})
    path = report.write_report()
    text = path.read_text()
    for title in ["# nanochat report card", "## Summary", "## Tokenizer", "## Base model (pretraining)",
                  "## Midtraining", "## Supervised finetuning", "## Reinforcement learning"]:
        assert title in text
    assert "- wall time: 0h00m" in text and "unknown" not in text.split("- wall time:")[1].splitlines()[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and line.count("|") == 6}
    assert rows["CORE"] == ["0.1100", "-", "-", "-"]
    assert rows["ARC-E"] == ["-", "-", "0.3100", "-"]
    assert rows["ChatCORE"] == ["-", "-", "0.0500", "-"]
    assert "train loss: first 5.0000, last 3.0000 over 3 logged steps" in text
    assert "Midtraining\n\nnot run" in text
    assert "CORE here is CORE-offline (14/22 tasks)" in text
    assert "| val bpb | 2.5000 |" in text and "| n |" not in text
    assert (base_dir / "report" / "base_curves.png").stat().st_size > 1000
    assert "![base curves](base_curves.png)" in text

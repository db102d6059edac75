"""Where a chat model's calculator use fails: held-out arithmetic accuracy by phrasing family, operation and number
style (words, thousands separators, decimals, negatives), and what each miss did (no call, the wrong operation,
a wrong operand, a right call with a wrong final statement).

chat-eval gives the two totals (trained phrasings, held-out families); this splits them, greedy decoding with the
tool, the same problems as chat-eval's (the test split's first --problems). Quality, not speed: the machine's load
does not change the result.

    NANOCHAT_BASE_DIR=~/.cache/nanochat python bench/arithmetic_breakdown.py --source rl --problems 300
    python bench/arithmetic_breakdown.py --source sft --phrasing unseen --misses 20
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

import torch

from nanochat.inference.engine import Engine
from nanochat.model.checkpoint import load_chat_model
from nanochat.tasks.arithmetic import Arithmetic, split_call

_CALL = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>", re.DOTALL)


def miss_kind(want: str, reply: str) -> str:
    m = _CALL.search(reply)
    if not m:
        return "no call"
    got, expected = split_call(m.group(1)), split_call(want)
    if got is None:
        return "malformed call"
    if got[1] != expected[1]:
        return "wrong operation"
    same = {got[0], got[2]} == {expected[0], expected[2]} if expected[1] in "+*" else got == expected
    return "wrong statement" if same else "wrong operand"


def categories(conv: dict) -> list[str]:
    _, op, _ = split_call(conv["expression"])
    cats = ["all", f"family {conv['family']}", f"operation {op}"]
    written = conv["operands"]
    cats += [name for name, hit in [("number words", any(re.search("[a-z]", w) for w in written)),
                                    ("separators", any("," in w for w in written)),
                                    ("decimals", any("." in w for w in written)),
                                    ("negatives", any(w.startswith("-") for w in written))] if hit]
    return cats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="rl", choices=["mid", "sft", "rl"])
    p.add_argument("--problems", type=int, default=300)
    p.add_argument("--phrasing", default="seen,unseen", help="seen, unseen or both (comma-separated)")
    p.add_argument("--misses", type=int, default=10, help="misses to print per phrasing")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, meta, _ = load_chat_model(args.source, device="cpu")
    print(f"{args.source} step {meta.get('step')}, {args.problems} held-out problems per phrasing, greedy, with the tool")
    for phrasing in args.phrasing.split(","):
        task = Arithmetic(size=args.problems, split="test", phrasing=phrasing)
        convs = [task[i] for i in range(len(task))]
        engine = Engine(model, tokenizer, tools=True, prefix_cache_tokens=0)
        outs = engine.generate([tokenizer.render_for_completion(c) for c in convs], 1, 64, 0.0, 50, batch_size=16,
                               seeds=[42 + 1000 * i for i in range(len(convs))])
        score, kinds, misses = defaultdict(lambda: [0, 0]), Counter(), []
        for conv, [(ids, _)] in zip(convs, outs):
            reply = tokenizer.decode(ids)
            ok = task.evaluate(conv, reply)
            for cat in categories(conv):
                score[cat][0] += ok
                score[cat][1] += 1
            if not ok:
                kinds[miss_kind(conv["expression"], reply)] += 1
                misses.append(f"  {conv['messages'][0]['content']!r}\n    want {conv['expression']}, got {reply[:100]!r}")
        print(f"\n== {phrasing} phrasings: {score['all'][0]}/{score['all'][1]} = {score['all'][0] / score['all'][1]:.2f}")
        print(f"{'category':32s} {'right':>9s} {'rate':>5s}")
        for cat in sorted(score, key=lambda c: (c != "all", c.startswith("family"), c)):
            right, n = score[cat]
            print(f"{cat:32s} {right:4d}/{n:<4d} {right / n:5.2f}")
        print("misses: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
        print("\n".join(misses[:args.misses]))


if __name__ == "__main__":
    main()

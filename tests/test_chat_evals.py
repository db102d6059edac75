"""Chat evals: batched categorical scoring equals one-at-a-time scoring, batched generation equals the model's naive
sampler, pass@k and ChatCORE bookkeeping, and two gloo ranks give the single-process numbers."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

tokenizer_mod = pytest.importorskip("nanochat.tokenizer", reason="the native tokenizer is not built",
                                    exc_type=ImportError)

from nanochat.common import init_process_group  # noqa: E402
from nanochat.evals import chat  # noqa: E402
from nanochat.inference.engine import Engine  # noqa: E402
from nanochat.model.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.tasks import ListTask  # noqa: E402
from nanochat.tasks.base import render_mc  # noqa: E402


def _texts():
    return [f"Question {i}: which colour is {c}? - red=A - blue=B - green=C - pink=D answer {c}"
            for i in range(50) for c in "ABCD"]


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_mod.Tokenizer.train_from_iterator(_texts(), vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=128, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                      n_embd=64))
    m.init_weights()
    with torch.no_grad():  # init zeroes the output projections; random weights make the test meaningful
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def mc_task(n: int = 13) -> ListTask:
    convs = []
    for i in range(n):
        choices = [f"colour {i}", f"shade {i + 1}", "grey", "teal"]
        answer = "ABCD"[i % 4]
        convs.append({"messages": [{"role": "user", "content": render_mc(f"Pick {i}?", choices)},
                                   {"role": "assistant", "content": answer}], "letters": "ABCD", "answer": answer})
    task = ListTask(convs, name="MC")
    task.eval_type, task.letters = "categorical", "ABCD"
    return task


class EchoTask(ListTask):
    """Generative: passes when the completion contains the conversation's target text."""
    eval_type = "generative"

    def evaluate(self, conversation, completion):
        return conversation["target"] in completion


def test_categorical_batched_equals_one_by_one(model, tokenizer):
    convs = list(mc_task())
    batched_scores = chat.categorical_scores(model, tokenizer, convs, "cpu", batch_size=5)
    batched = chat.categorical_predictions(model, tokenizer, convs, "cpu", batch_size=5)
    letter_ids = chat.letter_ids(tokenizer, "ABCD")
    single = []
    for conv, scores in zip(convs, batched_scores):
        ids = tokenizer.render_for_completion(conv)
        logits = model(torch.tensor([ids]))[0, -1]
        assert torch.allclose(scores, logits[letter_ids], atol=1e-4)  # padding never reaches the scored position
        single.append("ABCD"[int(logits[letter_ids].argmax())])
    assert batched == single
    assert len({tuple(s.tolist()) for s in batched_scores}) == len(convs)  # the scores depend on the question
    correct, total = chat.evaluate_categorical(model, tokenizer, mc_task(), "cpu", batch_size=4)
    assert total == 13 and correct == sum(p == c["answer"] for p, c in zip(single, convs))


def test_letters_must_be_single_tokens(tokenizer):
    with pytest.raises(ValueError, match="one token per letter"):
        chat.letter_ids(tokenizer, ["A", "question"])


def test_batched_generation_equals_naive_sampler(model, tokenizer):
    prompts = [tokenizer.encode(t, prepend=tokenizer.bos_token_id) for t in ["Question 1", "which colour", "pink=D"]]
    outs = Engine(model, tokenizer, prefix_cache_tokens=0).generate(prompts, num_samples=2, max_tokens=10,
                                                                    temperature=0.0, batch_size=3)
    terminal = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|bos|>")}
    for prompt, samples in zip(prompts, outs):
        ref = []
        for tok in model.generate(prompt, max_tokens=10, temperature=0.0):
            if tok in terminal:
                break
            ref.append(tok)
        assert tokenizer.encode_special("<|python_start|>") not in ref  # no tool call: the sampler is comparable
        assert samples[0][0] == ref and samples[1][0] == ref  # greedy: both samples equal the reference
        assert samples[0][1] == [1] * len(ref)


def test_pass_at_k_and_chatcore(model, tokenizer):
    prompt_convs = []
    for i in range(4):
        conv = {"messages": [{"role": "user", "content": f"Question {i}"}], "target": ""}
        prompt_convs.append(conv)
    always = EchoTask(prompt_convs)
    correct, total = chat.evaluate_generative(model, tokenizer, always, "cpu", num_samples=3, max_tokens=4,
                                              temperature=1.0)
    assert (correct, total) == (4, 4)  # "" is in every completion
    never = EchoTask([dict(c, target="\x00impossible") for c in prompt_convs])
    assert chat.evaluate_generative(model, tokenizer, never, "cpu", num_samples=2, max_tokens=4)[0] == 0
    report = chat.run_chat_eval(model, tokenizer, "cpu", ["MMLU", "GSM8K"], tasks={"MMLU": mc_task(8),
                                                                                     "GSM8K": always},
                                num_samples=2, max_tokens=4, temperature=1.0, log=lambda *a: None)
    mmlu, gsm = report["tasks"]["MMLU"], report["tasks"]["GSM8K"]
    assert gsm["accuracy"] == 1.0 and gsm["pass_at_k"] == 2 and mmlu["type"] == "categorical"
    assert mmlu["centered"] == pytest.approx((mmlu["accuracy"] - 0.25) / 0.75)
    assert report["chatcore"] == pytest.approx((mmlu["centered"] + 1.0) / 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, state, vocab, tok_path, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tok = tokenizer_mod.Tokenizer.load(tok_path)
        m = GPT(GPTConfig(sequence_len=128, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
        m.load_state_dict(state)
        m.eval()
        queue.put((rank, chat.evaluate_categorical(m, tok, mc_task(), "cpu", batch_size=4)))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(model, tokenizer, tmp_path):
    tok_path = tmp_path / "tok.bin"
    tokenizer.save(tok_path)
    single = chat.evaluate_categorical(model, tokenizer, mc_task(), "cpu", batch_size=4)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, state, model.config.vocab_size, str(tok_path), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=180) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():  # a hung rank must not outlive the test
                p.terminate()
    assert results[0] == results[1] == single

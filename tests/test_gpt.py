"""GPT: config derivation, forward/loss semantics, causality, KV-cache parity (aligned and ragged rows, GQA),
attention routed through nanochat_kernels, the reference sampler, and the FLOPs/params bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nanochat_kernels
from nanochat.inference.kv_cache import KVCache
from nanochat.model.gpt import GPT, GPTConfig

V = 97


def tiny(n_kv_head=2, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=V, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, **kw)
    model = GPT(cfg)
    # give the zero-initialised projections and the tiny head some weight so the parity tests see real signal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("depth,width,heads,head_dim", [(20, 1280, 10, 128), (4, 256, 2, 128), (1, 64, 1, 64),
                                                       (3, 192, 3, 64), (26, 1664, 13, 128)])
def test_from_depth(depth, width, heads, head_dim):
    cfg = GPTConfig.from_depth(depth, vocab_size=1000, sequence_len=128)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (depth, width, heads, heads,
                                                                                  head_dim)
    assert cfg.vocab_size == 1000 and cfg.sequence_len == 128


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="depth"):
        GPTConfig.from_depth(0)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig.from_depth(20, n_kv_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=64)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_head=3, n_kv_head=3, n_embd=64)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0)


# ---------------------------------------------------------------------------------------------------------------
# Structure and init


def test_structure_and_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    names = dict(model.named_parameters())
    assert not any(n.endswith("bias") for n in names), "no biases anywhere"
    assert model.wte.weight.data_ptr() != model.lm_head.weight.data_ptr(), "embedding and head are untied"
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
        assert block.attn.c_k.weight.shape == (32, 64)  # GQA: 1 kv head of dim 32
        assert block.mlp.c_fc.weight.shape == (256, 64)  # 4x MLP
    assert model.lm_head.weight.std() < 0.01
    # near-uniform predictions at init: loss ~ ln(V)
    x = torch.randint(0, V, (2, 16))
    loss = model(x, torch.randint(0, V, (2, 16)))
    assert abs(loss.item() - math.log(V)) < 0.05
    # the rotary tables cover 10x the sequence length and are not saved
    assert model.cos.shape == (160, 16) and "cos" not in model.state_dict()


def test_num_params_and_flops():
    model = tiny()
    C, L, V_, kv = 64, 2, V, 2 * 16
    per_block = C * C * 2 + 2 * C * kv + 8 * C * C  # q, proj, k, v, fc, mlp proj
    assert model.num_params() == 2 * V_ * C + L * per_block
    assert model.estimate_flops() == 6 * (V_ * C + L * per_block) + 12 * L * 4 * 16 * 32


# ---------------------------------------------------------------------------------------------------------------
# Forward and loss


def test_forward_shapes_and_ignore_index():
    model = tiny()
    x = torch.randint(0, V, (3, 10))
    y = torch.randint(0, V, (3, 10))
    logits = model(x)
    assert logits.shape == (3, 10, V) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-cap
    y[0, :4] = -1
    y[2, 7:] = -1
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (30,)
    assert torch.all(per_token[y.view(-1) == -1] == 0)
    valid = y.view(-1) != -1
    expected = F.cross_entropy(logits.view(-1, V)[valid], y.view(-1)[valid])
    torch.testing.assert_close(model(x, y), expected)
    torch.testing.assert_close(per_token.sum() / valid.sum(), expected)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(x, y, loss_reduction="avg")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(x[0])


def test_causal():
    model = tiny()
    x = torch.randint(0, V, (1, 12))
    x2 = x.clone()
    x2[0, 7] = (x[0, 7] + 1) % V
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_training_overfits_a_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    opt = model.setup_optimizer()
    x = torch.randint(0, V, (4, 17))
    first = None
    for _ in range(25):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first


# ---------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_matches_full_forward(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    x = torch.randint(0, V, (2, 14))
    full = model(x)
    cache = KVCache(2, 20, 2, n_kv_head, 16)
    pieces = [model(x[:, :6], kv_cache=cache)]  # prefill of an empty cache
    pieces.append(model(x[:, 6:9], kv_cache=cache))  # a multi-token chunk over a non-empty cache
    for t in range(9, 14):
        pieces.append(model(x[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.cache_lens.tolist() == [14, 14]


def test_kv_cache_ragged_rows_use_their_own_positions():
    model = tiny()
    a = torch.randint(0, V, (1, 9))
    b = torch.randint(0, V, (1, 5))
    cache = KVCache(2, 16, 2, 2, 16)
    one = KVCache(1, 16, 2, 2, 16)
    model(a[:, :-1], kv_cache=one)  # prefill row 0 alone, then copy it in
    cache.copy_row(one, 0, 0)
    one.reset()
    model(b[:, :-1], kv_cache=one)
    cache.copy_row(one, 0, 1)
    assert cache.cache_lens.tolist() == [8, 4]
    out = model(torch.cat([a[:, -1:], b[:, -1:]]), kv_cache=cache)  # one decode step, rows at positions 8 and 4
    torch.testing.assert_close(out[0, -1], model(a)[0, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, -1], model(b)[0, -1], atol=1e-4, rtol=1e-4)
    assert cache.cache_lens.tolist() == [9, 5]


def test_attention_goes_through_nanochat_kernels(monkeypatch):
    calls = {"attention": 0, "decode_attention": 0}
    for name in calls:
        original = getattr(nanochat_kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(nanochat_kernels, name, counted)
    model = tiny()
    model(torch.randint(0, V, (1, 8)))
    assert calls == {"attention": 2, "decode_attention": 0}
    cache = KVCache(1, 16, 2, 2, 16)
    model(torch.randint(0, V, (1, 8)), kv_cache=cache)  # with a cache: decode attention, causal over the chunk
    assert calls == {"attention": 2, "decode_attention": 2}
    model(torch.randint(0, V, (1, 1)), kv_cache=cache)
    assert calls == {"attention": 2, "decode_attention": 4}


def test_positions_beyond_rotary_table_raise():
    model = tiny()
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, 321, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# Reference sampler


def test_generate_greedy_matches_argmax_and_seeds_reproduce():
    model = tiny()
    prompt = [3, 14, 15, 92]
    greedy = list(model.generate(prompt, 6, temperature=0.0))
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(prompt):]
    assert list(model.generate(prompt, 6, top_k=1)) == greedy
    s1 = list(model.generate(prompt, 12, temperature=1.0, seed=1))
    assert s1 == list(model.generate(prompt, 12, temperature=1.0, seed=1))
    assert all(0 <= t < V for t in s1)
    samples = {tuple(model.generate(prompt, 12, temperature=1.5, seed=s)) for s in range(4)}
    assert len(samples) > 1
    top3 = set(torch.topk(model(torch.tensor([prompt]))[0, -1], 3).indices.tolist())
    assert all(next(model.generate(prompt, 1, top_k=3, seed=s)) in top3 for s in range(10))
    with pytest.raises(ValueError, match="temperature"):
        next(model.generate(prompt, 1, temperature=-1))
    with pytest.raises(ValueError, match="prompt"):
        next(model.generate([], 1))


@pytest.mark.gpu
def test_cuda_bf16_forward_close_to_fp32():
    model = tiny()
    x = torch.randint(0, V, (2, 16))
    ref = model(x)
    out = model.cuda()(x.cuda())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Bits per byte (evals/bpb.py)


def test_bits_per_byte_counts_bytes_not_tokens():
    from nanochat.model.bpb import evaluate_bpb

    model = tiny()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, V, (2, 8), generator=gen), torch.randint(0, V, (2, 8), generator=gen))
               for _ in range(3)]
    batches[1][1][0, :3] = -1  # ignored targets
    token_bytes = torch.randint(1, 5, (V,), generator=gen, dtype=torch.int32)
    token_bytes[-9:] = 0  # specials: no bytes, and their loss does not count
    batches[2][1][1, 2] = V - 1
    nats, n_bytes = 0.0, 0
    for x, y in batches:
        loss = model(x, y, loss_reduction="none")
        for t, l in zip(y.view(-1).tolist(), loss.tolist()):
            if t >= 0 and token_bytes[t] > 0:
                nats += l
                n_bytes += int(token_bytes[t])
    expected = nats / math.log(2) / n_bytes
    assert evaluate_bpb(model, batches, 3, token_bytes) == pytest.approx(expected, rel=1e-6)
    assert evaluate_bpb(model, batches, 10, token_bytes) == pytest.approx(expected, rel=1e-6)  # stops when out
    # doubling every token's byte count halves bpb: the measure is per byte, not per token
    assert evaluate_bpb(model, batches, 3, 2 * token_bytes) == pytest.approx(expected / 2, rel=1e-6)
    with pytest.raises(ValueError, match="no target bytes"):
        evaluate_bpb(model, batches, 3, torch.zeros(V, dtype=torch.int32))

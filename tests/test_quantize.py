"""Inference weight formats (quantize.py): the int8 and bf16 layers against their plain-torch references, model
conversion, the streaming checkpoint load (same bytes as converting a loaded model, chunk by chunk), the engine on a
converted model against the reference sampler on the same model, and the quality guard on a trained tiny model
(bits per byte within the bounds, greedy agreement, auto's pick, its cache, and a model the guard must reject)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nanochat.inference.engine import Engine
from nanochat.model import quantize as qz
from nanochat.model.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------------------------
# Layers against their references


def test_quantize_rows_round_trip_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=g) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different scales
    w[5] = 0.0
    q, scale = qz.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    assert int(q.abs().max()) == 127  # every nonzero row uses the full range
    assert torch.equal(q[5], torch.zeros(53, dtype=torch.int8)) and scale[5] == 1.0
    err = (qz.dequantize_rows(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # round to nearest: half a step per element


@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64), (16, 96), (2, 40, 64)])  # the last: the bf16 GEMM path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(shape[-1], 72, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
    q8 = qz.convert_model(torch.nn.Sequential(lin), "int8")[0]
    x = torch.randn(shape, generator=g).to(dtype)
    y = q8(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 72)
    # the kernel takes bf16 activations and returns bf16: the reference on the same bf16 input, to bf16 rounding
    ref = qz.int8_linear_reference(x.to(torch.bfloat16).float(), q8.int8_matrix(), q8.scale)
    assert rel_err(y, ref) < 8e-3
    assert rel_err(q8.weight, lin.weight) < 1 / 127  # the dequantized matrix the fused loss uses
    assert (x.numel() // shape[-1] >= qz.DEQUANT_MIN_ROWS) == (shape == (2, 40, 64))


def test_bf16_linear_matches_reference():
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(80, 48, bias=False)
    b16 = qz.convert_model(torch.nn.Sequential(copy.deepcopy(lin)), "bf16")[0]
    x = torch.randn(4, 7, 80, generator=g)
    y = b16(x)
    assert y.dtype == torch.float32
    assert rel_err(y, qz.bf16_linear_reference(x, b16.wbf16)) < 8e-3
    assert rel_err(y, lin(x)) < 2e-2


def test_convert_model_covers_every_linear_and_keeps_embedding_and_cache_dtype(tok):
    model = tiny_model(tok.vocab_size, seed=3)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    int8 = qz.convert_model(copy.deepcopy(model), "int8")
    assert sum(isinstance(m, qz.Int8Linear) for m in int8.modules()) == n_linear
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())
    assert qz.model_format(int8) == "int8" and qz.model_format(model) == "fp32"
    assert next(int8.parameters()).dtype == torch.float32  # the scheduler's KV-cache dtype stays the compute dtype
    assert qz.matmul_weight_bytes(int8) < qz.matmul_weight_bytes(model) / 3.5
    copied = qz.converted_copy(model, "int8").state_dict()  # the guard's memory-lean conversion: the same bytes
    assert copied.keys() == int8.state_dict().keys()
    assert all(torch.equal(v, int8.state_dict()[k]) for k, v in copied.items())
    with pytest.raises(ValueError, match="already converted"):
        qz.convert_model(int8, "bf16")
    with pytest.raises(ValueError, match="int4"):
        qz.convert_model(model, "int4")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _save_tiny_checkpoint(model, tag="tiny"):
    from dataclasses import asdict

    from nanochat.model.checkpoint import checkpoint_dir, save_checkpoint

    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # as saved from a compiled model
    return save_checkpoint(checkpoint_dir("sft", tag), 7, state, None, {"config": asdict(model.config), "step": 7})


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_streaming_load_equals_converting_the_loaded_model(base_dir, tok, monkeypatch, fmt):
    from nanochat.model import checkpoint as ck

    monkeypatch.setattr("nanochat.model.checkpoint.get_tokenizer", lambda path=None: tok)  # where load_model finds it
    monkeypatch.setattr(qz, "_CHUNK_BYTES", 1000)  # several chunks per matrix (64-wide rows: 3 rows a chunk)
    model = tiny_model(tok.vocab_size, seed=4)
    _save_tiny_checkpoint(model)
    loaded, _, meta = ck.load_model("sft", weights=fmt)
    assert meta["weights"] == fmt and qz.model_format(loaded) == fmt and not loaded.training
    expected = qz.convert_model(copy.deepcopy(model), fmt).state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert torch.equal(loaded.cos, model.cos) and torch.equal(loaded.sin, model.sin)  # rebuilt, not in the file
    x = torch.randint(0, tok.vocab_size, (2, 12))
    assert torch.equal(loaded(x), qz.convert_model(copy.deepcopy(model), fmt)(x))


def test_streaming_load_refuses_a_file_that_does_not_fit(base_dir, tok, monkeypatch, tmp_path):
    from safetensors.torch import save_file

    from nanochat.common import CorruptInputError

    model = tiny_model(tok.vocab_size, seed=5)
    state = model.state_dict()
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(path))
    with pytest.raises(CorruptInputError, match="missing.*lm_head.weight"):
        qz.load_converted(model.config, path, "int8")
    state["lm_head.weight"] = state["lm_head.weight"][:-1].contiguous()
    save_file(state, str(path))
    with pytest.raises(CorruptInputError, match="lm_head.weight has shape"):
        qz.load_converted(model.config, path, "int8")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptInputError):
        qz.load_converted(model.config, path, "int8")


def test_weights_flag_on_every_generating_command():
    from nanochat.evals import base_eval, chat_eval
    from nanochat.serve import chat_cli
    from nanochat.serve import cli as serve_cli

    assert chat_cli.build_parser().parse_args([]).weights == "auto"
    assert serve_cli.build_parser().parse_args(["--weights", "int8"]).weights == "int8"
    assert chat_eval.parse_args(["--weights", "bf16"]).weights == "bf16"
    assert base_eval.parse_args([]).weights == "fp32"  # the training result as trained unless asked
    with pytest.raises(SystemExit) as e:
        chat_cli.build_parser().parse_args(["--weights", "int4"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# The engine on a converted model


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_engine_on_converted_model_matches_its_reference_sampler(tok, fmt):
    """Batched, chunked prefill (8 tokens a step), prefix reuse (the second call resends the first's prompts):
    greedy tokens equal GPT.generate's full recompute on the same converted model."""
    model = qz.convert_model(tiny_model(tok.vocab_size, n_layer=2, n_embd=64, sequence_len=256, seed=1), fmt)
    terminal = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    prompts = [tok.render_for_completion({"messages": [{"role": "user", "content": t}]})
               for t in ("hello there", "what is 2+2? tell me", "a much longer question about the weather today")]

    def reference(prompt, n):
        out = []
        for t in model.generate(prompt, n, temperature=0.0):
            if t in terminal:
                break
            out.append(t)
        return out

    engine = Engine(model, tok, tools=False, step_tokens=8)
    first = engine.generate(prompts, max_tokens=12, temperature=0.0, batch_size=2)
    again = engine.generate([p + first[0][0][0] for p in prompts[:1]] + prompts[1:], max_tokens=6, temperature=0.0,
                            batch_size=3)
    for i, prompt in enumerate(prompts):
        assert first[i][0][0] == reference(prompt, 12), i
    assert again[0][0][0] == reference(prompts[0] + first[0][0][0], 6)


# ---------------------------------------------------------------------------------------------------------------
# The quality guard on a trained tiny model


@pytest.fixture(scope="module")
def trained(tok):
    """A 2-layer model trained for 100 AdamW steps of 8 x 64 tokens on the tiny corpus: weights with real
    structure (~5 s on one idle core)."""
    from nanochat.model.tiny import tiny_corpus

    torch.manual_seed(0)
    ids = torch.tensor([t for text in tiny_corpus(60_000) for t in tok.encode(text)], dtype=torch.long)
    model = tiny_model(tok.vocab_size, n_layer=2, n_embd=64, sequence_len=128, seed=6, std=0.02)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_guard_bounds_and_greedy_agreement_on_a_trained_model(trained, tok):
    guard = qz.run_guard(trained, tok)
    assert guard["bpb"]["fp32"] < 4.0  # it learned something (a uniform 512-way guess is ~3x that)
    assert 0 <= abs(guard["rel"]["bf16"]) <= qz.GUARD_BOUNDS["bf16"], guard
    assert abs(guard["rel"]["int8"]) <= qz.GUARD_BOUNDS["int8"], guard
    assert guard["pass"] == {"fp32": True, "bf16": True, "int8": True}
    assert set(guard["ms_per_token"]) == {"fp32", "bf16", "int8"}
    assert qz.pick_format(guard) == min(guard["ms_per_token"], key=guard["ms_per_token"].get)
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("The ", "def main(", "import torch\n", "In the")]
    for fmt, floor in (("bf16", 0.95), ("int8", 0.9)):
        agree = qz.greedy_agreement(trained, qz.convert_model(copy.deepcopy(trained), fmt), prompts, 16)
        assert agree >= floor, (fmt, agree)


def test_auto_picks_the_fastest_format_that_keeps_quality():
    guard = {"pass": {"fp32": True, "bf16": True, "int8": True},
             "ms_per_token": {"fp32": 3.0, "bf16": 1.0, "int8": 2.0}}
    assert qz.pick_format(guard) == "bf16"
    assert qz.pick_format({**guard, "pass": {"fp32": True, "bf16": False, "int8": True}}) == "int8"
    assert qz.pick_format({**guard, "pass": {"fp32": True, "bf16": False, "int8": False}}) == "fp32"
    assert qz.pick_format({"pass": guard["pass"]}) == "int8"  # a cache from before timings: the smallest


@pytest.mark.slow
def test_guard_rejects_int8_when_outliers_crush_the_channels(trained, tok):
    """A dead channel (an MLP unit whose c_fc row is zero, so relu² gives exactly 0; a value channel whose c_v row
    is zero) whose output-projection column is 1000x the rest: the fp32 function barely changes, but every row's
    int8 scale is set by that column, so the rest of the row rounds to zero. Per-channel int8 loses the blocks'
    outputs, and auto must not pick it."""
    spoiled = copy.deepcopy(trained)
    with torch.no_grad():
        for block in spoiled.blocks:
            for into, out in ((block.mlp.c_fc, block.mlp.c_proj), (block.attn.c_v, block.attn.c_proj)):
                into.weight[0] = 0.0
                out.weight[:, 0] = 1000 * out.weight.abs().max()
    guard = qz.run_guard(spoiled, tok, qz.guard_sample(tok, 512))
    assert not guard["pass"]["int8"], guard
    assert qz.pick_format(guard) in ("bf16", "fp32")


@pytest.mark.slow
def test_auto_runs_the_guard_once_and_caches_it(trained, tok, tmp_path, monkeypatch):
    calls = []

    def load_fp32():
        calls.append(1)
        return trained, tok

    tokens = qz.guard_sample(tok, 256)
    monkeypatch.setattr(qz, "guard_sample", lambda tk, n=qz.GUARD_TOKENS: tokens)  # short: this test is the cache
    fmt, guard = qz.resolve_auto(tmp_path, "cpu", load_fp32)
    again, cached = qz.resolve_auto(tmp_path, "cpu", load_fp32)
    assert fmt == again == qz.pick_format(guard) and calls == [1]
    assert json.loads((tmp_path / qz.GUARD_FILE).read_text()) == cached == guard
    (tmp_path / qz.GUARD_FILE).write_text(json.dumps({**guard, "pass": {"fp32": True, "bf16": True, "int8": False},
                                                      "ms_per_token": {"fp32": 3.0, "bf16": 1.0, "int8": 0.5}}))
    assert qz.resolve_auto(tmp_path, "cpu", load_fp32)[0] == "bf16"
    assert qz.resolve_auto(tmp_path, "cuda", load_fp32)[0] == "fp32" and calls == [1]


# ---------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_layers_on_cuda_at_d20_shapes(fmt):
    """bf16 activations (autocast's residual stream) through the CUDA kernels at d20's matrix shapes."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for K, N in ((1280, 1280), (1280, 5120), (5120, 1280), (1280, 65536)):
        w = torch.randn(N, K, device="cuda", generator=g) * K ** -0.5
        layer = qz.LINEAR_CLASSES[fmt](K, N, device="cuda")
        layer.set_rows(0, w)
        x = torch.randn(16, K, device="cuda", generator=g).to(torch.bfloat16)
        y = layer(x)
        if fmt == "int8":
            ref = qz.int8_linear_reference(x.float(), layer.int8_matrix(), layer.scale)
        else:
            ref = qz.bf16_linear_reference(x.float(), layer.wbf16)
        assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 1e-2, (K, N)


@pytest.mark.gpu
def test_engine_on_cuda_int8_with_cuda_graphs_matches_reference(tok):
    model = qz.convert_model(tiny_model(tok.vocab_size, sequence_len=256, seed=1).cuda(), "int8")
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "hello there"}]})
    engine = Engine(model, tok, tools=False, cuda_graphs=True)
    got = engine.generate([prompt], max_tokens=12, temperature=0.0)[0][0][0]
    terminal = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    expected = []
    for t in model.generate(prompt, 12, temperature=0.0):
        if t in terminal:
            break
        expected.append(t)
    assert got == expected


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_a_converted_lm_head_is_called_not_rebuilt(tok, fmt, monkeypatch):
    """The logits come from the layer: reading `.weight` would rebuild the fp32 matrix every decode step (it did,
    once vocabulary padding sliced the matrix: a d20 int8 step took 334 ms instead of 46)."""
    model = qz.convert_model(tiny_model(tok.vocab_size, seed=5), fmt)
    want = model(torch.tensor([[1, 2, 3]]))

    def refuse(self):
        raise AssertionError("the forward read the dequantized matrix")
    monkeypatch.setattr(type(model.lm_head), "weight", property(refuse))
    assert torch.equal(model(torch.tensor([[1, 2, 3]])), want)

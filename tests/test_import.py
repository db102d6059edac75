"""`nanochat import` against checkpoints written by Karpathy's nanochat itself, one per architecture era, with the
logits and greedy tokens nanochat's own forward produced (../shared/data/nanochat-checkpoints, see its README).

Every path must reproduce them: the model's forward, the KV cache (chunked prefill + decode), the engine (batched
with other prompts of other lengths, with chunked prefill, with a reused prefix), the server through the official
openai client, and the exported folder loaded by transformers. The same with the weights stored in bf16. Loading
never runs code from the files: a tokenizer.pkl built to run a command is refused with one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from nanochat.hf.importer import import_checkpoint
from nanochat.inference.engine import Engine
from nanochat.inference.kv_cache import KVCache
from nanochat.model.checkpoint import load_exported

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nanochat-checkpoints"
ERAS = ("launch", "jan2026", "head")
if not FIXTURES.is_dir():
    pytest.skip(f"the nanochat ground-truth checkpoints are not at {FIXTURES} (../shared of the repository)",
                allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py
TOL = 1e-4  # fp32, as the fixtures' README states
BF16_TOL = 4 * 2 ** -8  # relative to the largest logit: all weights rounded to bf16 (8 significant bits)


def expected(era: str) -> dict:
    return torch.load(FIXTURES / era / "expected.pt", weights_only=True)


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """era -> our model folder imported from the fixture (once per module)."""
    root = tmp_path_factory.mktemp("imported")
    return {era: import_checkpoint(str(FIXTURES / era), root / era, log=quiet) for era in ERAS}


@pytest.fixture(scope="module")
def loaded(folders):
    return {era: load_exported(folder)[:2] for era, folder in folders.items()}


def nanochat_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy over the full forward (no cache), argmax over the real ids, as the fixtures were made."""
    return list(model.generate(prompt, n, temperature=0.0))


# ---------------------------------------------------------------------------------------------------------------
# The model's forward


@pytest.mark.parametrize("era", ERAS)
def test_forward_matches_nanochat(loaded, era):
    model, _ = loaded[era]
    exp = expected(era)
    with torch.no_grad():
        for seq, logits in zip(exp["sequences"], exp["logits"]):
            got = model(torch.tensor([seq]))[0]
            assert got.shape == logits.shape
            assert (got - logits).abs().max().item() < TOL
    for seq, greedy in zip(exp["sequences"][1:], exp["greedy"]):
        assert nanochat_greedy(model, seq, len(greedy)) == greedy


def test_eras_are_detected_and_assumptions_printed(tmp_path):
    lines = []
    import_checkpoint(str(FIXTURES / "head"), tmp_path / "head", log=lines.append)
    text = "\n".join(lines)
    assert "era: head" in text and "assumed: qk_scale = 1.2" in text and "assumed: rotary_base = 100000.0" in text
    assert "20 extra rows are dropped" in text
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["smear"] and config["backout"] and config["ve_layers"] == [1, 3] and config["ve_gate_channels"] == 12
    assert config["nanochat"]["nanochat_era"] == "head" and config["vocab_size"] == 300


@pytest.mark.parametrize("era", ERAS)
def test_state_shapes_match_the_model(loaded, era):
    from nanochat.model.gpt import GPT, state_shapes

    model, _ = loaded[era]
    for config in (model.config, dataclasses.replace(model.config, n_layer=5, pad_vocab_to=128, ve_layers=[0, 4])):
        assert state_shapes(config) == {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}


def test_a_wrong_preset_is_visible_in_the_logits(tmp_path):
    """The presets matter: the jan2026 file read with another short window no longer reproduces nanochat."""
    folder = import_checkpoint(str(FIXTURES / "jan2026"), tmp_path / "j", overrides={"short_window": 64}, log=quiet)
    model, _ = load_exported(folder)[:2]
    exp = expected("jan2026")
    with torch.no_grad():
        assert (model(torch.tensor([exp["sequences"][0]]))[0] - exp["logits"][0]).abs().max().item() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# KV cache and engine


@pytest.mark.parametrize("era", ERAS)
def test_kv_cache_prefill_chunks_and_decode_match(loaded, era):
    """Rows of different lengths in one cache: a prefill chunk, a second chunk, then one token at a time."""
    model, _ = loaded[era]
    exp = expected(era)
    cfg = model.config
    for seq, logits in zip(exp["sequences"], exp["logits"]):
        cache = KVCache(1, cfg.sequence_len, cfg.n_layer, cfg.n_kv_head, cfg.head_dim)
        ids = torch.tensor([seq])
        cut = min(7, len(seq) - 1)
        cut2 = min(len(seq), cut + 20)
        with torch.no_grad():
            parts = [model(ids[:, :cut], kv_cache=cache), model(ids[:, cut:cut2], kv_cache=cache)]
            parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(cut2, len(seq))]
        got = torch.cat(parts, dim=1)[0]
        assert (got - logits).abs().max().item() < TOL


@pytest.mark.parametrize("era", ERAS)
def test_engine_batched_chunked_and_prefix_reuse(loaded, era):
    model, tok = loaded[era]
    exp = expected(era)
    prompts = [exp["sequences"][1], exp["sequences"][2]]
    others = [exp["sequences"][0][:13], exp["sequences"][0][5:30]]  # other prompts of other lengths in the batch
    refs = exp["greedy"] + [nanochat_greedy(model, p, 20) for p in others]
    # step_tokens 12: prompts prefill in chunks alongside decoding rows; the prefix store holds all four replies
    engine = Engine(model, tok, tools=False, step_tokens=12, prefix_cache_tokens=1024)
    out = engine.generate(prompts + others, max_tokens=20, temperature=0.0, batch_size=4)
    assert [o[0][0] for o in out] == refs
    # the next turn of the first prompt: its prefix (prompt + 10 replied tokens) comes from the prefix store
    hits = engine.prefix_store.hits
    follow = prompts[0] + refs[0][:10]
    [[(tokens, _)]] = engine.generate([follow], max_tokens=10, temperature=0.0)
    assert engine.prefix_store.hits == hits + 1
    assert tokens == refs[0][10:20]


# ---------------------------------------------------------------------------------------------------------------
# The server, through the official client


@pytest.mark.parametrize("era", ERAS)
def test_server_openai_client_greedy(loaded, era):
    openai = pytest.importorskip("openai")
    from nanochat.serve.app import ServerConfig, create_app
    from nanochat.serve.thread import ServerThread

    model, tok = loaded[era]
    messages = [{"role": "user", "content": "The ship came"}]
    prompt = tok.render_for_completion({"messages": messages})
    n = model.config.sequence_len - len(prompt)
    ref = nanochat_greedy(model, prompt, n)
    stops = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    end = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    with ServerThread(create_app(model, tok, ServerConfig(batch_size=4, max_waiting=8))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="nanochat", messages=messages, temperature=0, max_tokens=n)
    assert r.choices[0].message.content == tok.decode(ref[:end])
    assert r.usage.completion_tokens == min(end + 1, n)


# ---------------------------------------------------------------------------------------------------------------
# transformers


@pytest.mark.slow
@pytest.mark.parametrize("era", ERAS)
def test_transformers_loads_the_folder(folders, era):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    exp = expected(era)
    hf = AutoModelForCausalLM.from_pretrained(folders[era], trust_remote_code=True).eval()
    with torch.no_grad():
        for seq, logits in zip(exp["sequences"], exp["logits"]):
            assert (hf(torch.tensor([seq])).logits[0] - logits).abs().max().item() < TOL
    prompts = exp["sequences"][1:]
    for seq, greedy in zip(prompts, exp["greedy"]):
        out = hf.generate(torch.tensor([seq]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert out[0, len(seq):].tolist() == greedy
    # left-padded together, with the attention mask: the same tokens (the smear gate skips the padding)
    width, pad = max(map(len, prompts)), hf.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out[:, width:].tolist() == exp["greedy"]


# ---------------------------------------------------------------------------------------------------------------
# bf16-stored weights


@pytest.mark.parametrize("era", ERAS)
def test_bf16_stored_weights(tmp_path, era):
    """CUDA-trained checkpoints store tensors in bf16 (and with `_orig_mod.` from torch.compile): the conversion is
    exact, and the logits stay within bf16 rounding of nanochat's fp32 ones, greedy tokens unchanged."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / era, src)
    state = torch.load(src / "model_000000.pt", weights_only=True)
    rounded = {"_orig_mod." + k: v.bfloat16() for k, v in state.items()}
    torch.save(rounded, src / "model_000000.pt")
    model, _ = load_exported(import_checkpoint(str(src), tmp_path / "out", log=quiet))[:2]
    ours = dict(model.state_dict())
    assert torch.equal(ours["wte.weight"], rounded["_orig_mod.transformer.wte.weight"][:300].float())
    exp = expected(era)
    with torch.no_grad():
        for seq, logits in zip(exp["sequences"], exp["logits"]):
            assert (model(torch.tensor([seq]))[0] - logits).abs().max().item() < BF16_TOL * logits.abs().max()
    for seq, greedy in zip(exp["sequences"][1:], exp["greedy"]):
        assert nanochat_greedy(model, seq, len(greedy)) == greedy


# ---------------------------------------------------------------------------------------------------------------
# Layouts: a base dir, a hub mirror


def test_base_dir_layout_with_an_sft_meta_without_window_pattern(tmp_path):
    """nanochat's base dir: stage folders with model tags, the tokenizer in tokenizer/; the SFT meta lacks the
    window pattern, so the era's SSSL is assumed (nanochat's own loader would assume L and miss)."""
    base = tmp_path / "nanochat"
    for stage, tag in (("base_checkpoints", "d4"), ("chatsft_checkpoints", "d4"), ("chatsft_checkpoints", "d2")):
        (base / stage / tag).mkdir(parents=True)
    (base / "tokenizer").mkdir()
    shutil.copy(FIXTURES / "jan2026" / "tokenizer.pkl", base / "tokenizer")
    sft = base / "chatsft_checkpoints" / "d4"
    shutil.copy(FIXTURES / "jan2026" / "model_000000.pt", sft / "model_000700.pt")
    meta = json.loads((FIXTURES / "jan2026" / "meta_000000.json").read_text())
    del meta["model_config"]["window_pattern"]
    (sft / "meta_000700.json").write_text(json.dumps(meta))
    lines = []
    folder = import_checkpoint(str(base), tmp_path / "out", source="sft", log=lines.append)
    assert "assumed: window_pattern = 'SSSL'" in "\n".join(lines)
    model, _ = load_exported(folder)[:2]
    exp = expected("jan2026")
    with torch.no_grad():
        assert (model(torch.tensor([exp["sequences"][0]]))[0] - exp["logits"][0]).abs().max().item() < TOL
    assert json.loads((folder / "config.json").read_text())["nanochat"]["stage"] == "sft"


def run_cli(capsys, *args) -> tuple[int, str]:
    """`nanochat import ARGS` in this process: (exit status, stderr)."""
    from nanochat.cli import main

    capsys.readouterr()
    rc = main(["import", *map(str, args)])
    return rc, capsys.readouterr().err


def test_hub_id_from_a_local_mirror(tmp_path, monkeypatch, capsys):
    """A hub id resolves through huggingface_hub; here offline, from a hub cache laid out as a download leaves it."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    revision = "0" * 40
    snap = cache / "models--someone--nanochat-head" / "snapshots" / revision
    shutil.copytree(FIXTURES / "head", snap)
    (cache / "models--someone--nanochat-head" / "refs").mkdir()
    (cache / "models--someone--nanochat-head" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rc, err = run_cli(capsys, "someone/nanochat-head", "--out", tmp_path / "out")
    assert rc == 0, err
    model, _ = load_exported(tmp_path / "out")[:2]
    exp = expected("head")
    with torch.no_grad():
        assert (model(torch.tensor([exp["sequences"][2]]))[0] - exp["logits"][2]).abs().max().item() < TOL
    rc, err = run_cli(capsys, "someone/absent", "--out", tmp_path / "x")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "someone/absent" in err


# ---------------------------------------------------------------------------------------------------------------
# Nothing runs from the files; bad files are one line and exit 2


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_tokenizer_pickle_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "launch", src)
    marker = tmp_path / "pwned"
    (src / "tokenizer.pkl").write_bytes(pickle.dumps(_RunsACommand(marker)))
    rc, err = run_cli(capsys, src, "--out", tmp_path / "out")
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "refused global posix.system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_corrupt_truncated_and_mismatched_files(tmp_path, capsys):
    from nanochat.common import UserError

    def broken(name: str, edit) -> Path:
        src = tmp_path / name
        shutil.copytree(FIXTURES / "head", src)
        edit(src)
        return src

    def truncate(src):
        data = (src / "model_000000.pt").read_bytes()
        (src / "model_000000.pt").write_bytes(data[: len(data) // 2])

    def mismatch(src):
        meta = json.loads((src / "meta_000000.json").read_text())
        meta["model_config"]["n_embd"] = 256
        (src / "meta_000000.json").write_text(json.dumps(meta))

    def garbage_tokenizer(src):
        (src / "tokenizer.pkl").write_bytes(b"\x80\x04not a pickle")

    def pickled_weights(src):
        torch.save({"transformer.wte.weight": torch.zeros(2), "x": _RunsACommand(tmp_path / "pwned2")},
                   src / "model_000000.pt")

    for name, edit, words in (("trunc", truncate, "truncated"), ("mismatch", mismatch, "does not match"),
                              ("tok", garbage_tokenizer, "not a safe tiktoken"),
                              ("pickled", pickled_weights, "refused")):
        with pytest.raises(UserError, match=words):
            import_checkpoint(str(broken(name, edit)), tmp_path / f"out-{name}", log=quiet)
    assert not (tmp_path / "pwned2").exists()
    rc, err = run_cli(capsys, tmp_path / "trunc", "--out", tmp_path / "out-cli")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err


def test_an_export_from_before_the_switches_still_loads(folders, tmp_path):
    """config.json of an older export has no switch fields: their defaults are that model."""
    from nanochat.model.gpt import GPTConfig

    old = tmp_path / "old"
    shutil.copytree(folders["launch"], old)
    config = json.loads((old / "config.json").read_text())
    for f in dataclasses.fields(GPTConfig)[6:]:
        config.pop(f.name)
    (old / "config.json").write_text(json.dumps(config))
    model, _ = load_exported(old)[:2]
    assert model.config == GPTConfig(**{f.name: config[f.name] for f in dataclasses.fields(GPTConfig)[:6]})


@pytest.mark.slow
def test_mid_train_starts_from_an_imported_model(folders, tmp_path, monkeypatch, capsys):
    """--model DIR starts a finetuning stage; the base dir adopts the folder's tokenizer (its checkpoints load with
    it), and a base dir holding another tokenizer is refused."""
    from nanochat.cli import main
    from nanochat.model.checkpoint import load_model
    from nanochat.tokenizer import Tokenizer, default_tokenizer_path
    from nanochat.training import mid_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    args = ["--model", str(folders["head"]), "--model-tag", "imp", "--device-batch-size", "4", "--num-iterations",
            "2", "--eval-every", "-1", "--eval-tokens", "256", "--spelling-size", "40", "--arithmetic-size", "40",
            "--device", "cpu", "--dtype", "fp32"]
    assert mid_train.main(args) == 0
    model, tok, _ = load_model("mid", model_tag="imp")
    assert model.config == load_exported(folders["head"])[0].config and tok.vocab_size == 300
    other = Tokenizer.train_from_iterator(["a different corpus, a different vocabulary " * 40], vocab_size=300)
    other.save(default_tokenizer_path())
    assert main(["mid-train", *args]) == 2
    assert "another tokenizer" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("era", ERAS)
def test_cuda_engine_with_graphs_matches_eager(folders, era):
    """On CUDA (bf16 autocast, Triton kernels, windowed decode): the engine's CUDA-graph decode step, which reads the
    smear gate's previous token from the cache inside the graph, gives the eager step's tokens."""
    model, tok = load_exported(folders[era], device="cuda")[:2]
    exp = expected(era)
    prompts = [exp["sequences"][1], exp["sequences"][2], exp["sequences"][0][:20]]
    outs = {}
    for graphs in (False, True):
        engine = Engine(model, tok, tools=False, cuda_graphs=graphs, prefix_cache_tokens=0)
        outs[graphs] = [o[0][0] for o in engine.generate(prompts, max_tokens=20, temperature=0.0, batch_size=4)]
    assert outs[True] == outs[False]

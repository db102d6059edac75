"""`nanochat import SRC --out DIR`: a checkpoint written by Karpathy's nanochat as one of our model folders.

SRC is one of
- a checkpoint folder (nanochat's `model_<step>.pt` + `meta_<step>.json`, the tokenizer beside it or in the base
  dir's `tokenizer/`),
- a nanochat base dir (`base_checkpoints/`, `mid_checkpoints/`, `chatsft_checkpoints/`, `chatrl_checkpoints/`, each
  with model tags inside; pick with --source and --tag, the largest dN tag by default, as nanochat does),
- a Hugging Face hub id such as karpathy/nanochat-d32 (downloaded with huggingface_hub into its cache, which
  resumes an interrupted download).
The output is the folder `nanochat export` writes, so `--model DIR` works for chat, serve, the evals, export and as
the start of mid-train, chat-sft and chat-rl.

nanochat's checkpoints come from three architecture eras; the file records only some of it. From the keys and
shapes: value embeddings (which layers, the gate's input width), resid/x0 lambdas, smear gate, backout, the padded
vocabulary. From meta: the window pattern (mid/SFT metas of some versions omit it). The rest comes from the era's
preset (the values nanochat's code had then) and is printed as "assumed"; each can be overridden by a flag:
    era       detected by                      rotary (base, tables)  q/k scale  value gate  short window
    launch    no value embeddings, no lambdas  10,000, bf16-rounded   1          -           -
    jan2026   value gate of 32 inputs          10,000, bf16-rounded   1          2 sigmoid   seq_len // 2
    mar2026   value gate of 12 inputs          100,000, fp32          1.15       3 sigmoid   ceil(seq_len/3, 128)
    head      a smear gate                     100,000, fp32          1.2        3 sigmoid   ceil(seq_len/4, 128)
(soft-cap 15 in all; nanochat used 20 from March 2 to 8, 2026: --softcap 20 for a model trained then.) The rotary
tables are bf16-rounded as nanochat computed them on every device until March 4, 2026; later, in fp32 on CPU (its
reference) and in bf16 on GPU (a jan2026-era model trained March 4-8: add --rotary-dtype float32).

Nothing in the files runs: weights through torch.load(weights_only=True) (memory-mapped, converted and written one
tensor at a time, so the peak stays near one copy of the weights), tokenizer.pkl through an unpickler that admits
only tiktoken's Encoding and builds our tokenizer from its plain data (it never constructs tiktoken). A bad file is
one line and exit 2.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from nanochat.common import MissingInputError, UserError
from nanochat.hf.export import write_model_folder
from nanochat.model.gpt import GPTConfig, state_shapes
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

STAGE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}
# what a hub download fetches: weights, meta and tokenizer (not optimizer shards, which can be larger than the model)
HUB_FILES = [f"{d}{name}" for d in ("", "*/") for name in ("model_*.pt", "meta_*.json", "tokenizer.pkl")]


# per era: what the file does not record. short_window is a function of sequence_len.
PRESETS = {
    "launch": dict(rotary_base=10_000.0, rotary_dtype="bfloat16", qk_scale=1.0, ve_gate_scale=2.0,
                   window_pattern="", short_window=lambda L: 0),
    "jan2026": dict(rotary_base=10_000.0, rotary_dtype="bfloat16", qk_scale=1.0, ve_gate_scale=2.0,
                    window_pattern="SSSL", short_window=lambda L: L // 2),
    "mar2026": dict(rotary_base=100_000.0, rotary_dtype="float32", qk_scale=1.15, ve_gate_scale=3.0,
                    window_pattern="SSSL", short_window=lambda L: 128 * math.ceil(math.ceil(L / 3) / 128)),
    "head": dict(rotary_base=100_000.0, rotary_dtype="float32", qk_scale=1.2, ve_gate_scale=3.0,
                 window_pattern="SSSL", short_window=lambda L: 128 * math.ceil(math.ceil(L / 4) / 128)),
}
ERAS = tuple(PRESETS)
OVERRIDES = ("rotary_base", "rotary_dtype", "qk_scale", "ve_gate_scale", "window_pattern", "short_window",
             "logit_softcap")


class ImportFailed(UserError, ValueError):
    """A source that cannot be imported: not a nanochat checkpoint, unsafe, corrupt, or inconsistent."""


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.pkl without running it


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: Encoding pickles as NEWOBJ of the class, then BUILD
    with a dict of its four constructor arguments (its __getstate__), which lands here as plain data."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"refused global {module}.{name} (a tokenizer.pkl holds only a tiktoken "
                                     f"Encoding's data)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id (a tokenizer.pkl holds only plain data)")


def load_tokenizer_pkl(path: Path):
    """Our Tokenizer from nanochat's tokenizer.pkl (a pickled tiktoken.Encoding), without executing the pickle."""
    try:
        obj = _TokenizerUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ImportFailed(f"{path} is not a safe tiktoken tokenizer pickle: {e}") from None
    state = getattr(obj, "state", None)
    if not isinstance(obj, _EncodingState) or not isinstance(state, dict):
        raise ImportFailed(f"{path} does not hold a tiktoken Encoding with its data (got {type(obj).__name__})")
    pat, ranks, specials = state.get("pat_str"), state.get("mergeable_ranks"), state.get("special_tokens")
    if not isinstance(pat, str) or not isinstance(ranks, dict) or not isinstance(specials, dict):
        raise ImportFailed(f"{path}: the Encoding lacks pat_str / mergeable_ranks / special_tokens")
    by_id = sorted((r, b) for b, r in ranks.items() if isinstance(b, bytes) and isinstance(r, int))
    if len(by_id) != len(ranks) or [r for r, _ in by_id] != list(range(len(by_id))) or len(by_id) < 256 \
            or any(by_id[i][1] != bytes([i]) for i in range(256)):
        raise ImportFailed(f"{path}: mergeable_ranks must map bytes to the ids 0..n-1, the 256 single bytes first")
    n = len(by_id)
    expected = {name: n + j for j, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        raise ImportFailed(f"{path}: special tokens {specials} differ from nanochat's {expected}")
    try:
        return Tokenizer.from_ranks([b for _, b in by_id], pattern=pat)
    except ValueError as e:
        raise ImportFailed(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Finding the checkpoint


def _steps(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))


def _largest_tag(stage_dir: Path) -> str:
    tags = [p.name for p in stage_dir.iterdir() if p.is_dir() and _steps(p)]
    if not tags:
        raise MissingInputError(f"no checkpoints (model_<step>.pt) under {stage_dir}")
    depth = [(int(m.group(1)), t) for t in tags if (m := re.match(r"d(\d+)", t))]
    if depth:
        return max(depth)[1]
    return max(tags, key=lambda t: (stage_dir / t).stat().st_mtime)


def locate(src: str, source: str | None = None, tag: str | None = None, step: int | None = None,
           revision: str | None = None, log=print) -> tuple[Path, int, Path]:
    """(checkpoint folder, step, tokenizer.pkl) for SRC: a folder, a base dir or a hub id."""
    path = Path(src).expanduser()
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not src.startswith((".", "/")):
            path = download(src, revision, log)
        else:
            raise MissingInputError(f"{src} is neither a folder nor a hub id like karpathy/nanochat-d32")
    if not path.is_dir():
        raise ImportFailed(f"{src} is a file; give the folder that holds model_<step>.pt and meta_<step>.json")
    stage_dirs = [d for d in STAGE_DIRS.values() if (path / d).is_dir()]
    if stage_dirs:  # a base dir
        if source is None:
            source = next(s for s in ("rl", "sft", "mid", "base") if STAGE_DIRS[s] in stage_dirs)
            log(f"assumed: --source {source} (the most finished stage present)")
        stage_dir = path / STAGE_DIRS[source]
        if not stage_dir.is_dir():
            raise MissingInputError(f"{path} has no {STAGE_DIRS[source]}/ (stages present: {stage_dirs})")
        tag = tag or _largest_tag(stage_dir)
        folder = stage_dir / tag
        if not folder.is_dir():
            raise MissingInputError(f"no model tag {tag!r} in {stage_dir}")
    else:
        folder = path if not tag else path / tag
    steps = _steps(folder)
    if not steps:
        nested = sorted({p.parent for p in folder.glob("*/model_*.pt")})
        if len(nested) == 1:
            folder, steps = nested[0], _steps(nested[0])
        else:
            raise MissingInputError(f"no model_<step>.pt in {folder}" + (f" (several inside: "
                                    f"{[p.name for p in nested]}; pick one with --tag)" if nested else ""))
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise MissingInputError(f"no step {step} in {folder} (steps: {steps})")
    for candidate in (folder, folder.parent, path, path / "tokenizer", folder.parent.parent / "tokenizer",
                      folder.parent / "tokenizer"):
        if (candidate / "tokenizer.pkl").is_file():
            return folder, step, candidate / "tokenizer.pkl"
    raise MissingInputError(f"no tokenizer.pkl beside {folder} or in a tokenizer/ folder of {path}")


def download(repo_id: str, revision: str | None, log=print) -> Path:
    """The hub repository's checkpoint files in the local hub cache (resumes a partial download)."""
    try:
        from huggingface_hub import snapshot_download  # heavy; only hub ids need it
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:
        raise ImportFailed(f"{repo_id} looks like a hub id, but huggingface_hub is not installed ({e})") from None
    log(f"downloading {repo_id} from the hub (or its local cache)")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise MissingInputError(f"cannot get {repo_id} from the hub: {' '.join(str(e).split())[:300]}") from None


# ---------------------------------------------------------------------------------------------------------------
# Reading and converting


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict, memory-mapped where the file allows (nothing is copied until a tensor is converted)."""
    if not zipfile.is_zipfile(path):
        raise ImportFailed(f"{path} is not a torch checkpoint (not a zip archive: truncated or another format)")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # an archive mmap cannot map (e.g. written without the aligned layout)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ImportFailed(f"{path} holds more than tensors, refused (weights_only): "
                           f"{' '.join(str(e).split())[:200]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise ImportFailed(f"{path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ImportFailed(f"{path} is not a state dict of named tensors")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def detect(state: dict[str, torch.Tensor], meta_config: dict) -> tuple[str, dict]:
    """(era, GPTConfig fields read from the file) from the keys, shapes and meta."""
    need = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
    missing = [k for k in need if not isinstance(meta_config.get(k), int)]
    if missing:
        raise ImportFailed(f"meta model_config lacks {missing} (got {sorted(meta_config)})")
    cfg = {k: meta_config[k] for k in need}
    ve_layers = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"value_embeds\.(\d+)\.weight", k)))
    gates = {int(m.group(1)): state[k].shape for k in state
             if (m := re.fullmatch(r"transformer\.h\.(\d+)\.attn\.ve_gate\.weight", k))}
    if sorted(gates) != ve_layers:
        raise ImportFailed(f"value embeddings on layers {ve_layers} but value gates on {sorted(gates)}")
    if ve_layers:
        widths = {shape[1] for shape in gates.values()}
        if len(widths) != 1:
            raise ImportFailed(f"value gates of different input widths {sorted(widths)}")
        cfg.update(ve_layers=ve_layers, ve_gate_channels=widths.pop())
    cfg["lambdas"] = "resid_lambdas" in state and "x0_lambdas" in state
    cfg["smear"] = "smear_gate.weight" in state
    cfg["backout"] = "backout_lambda" in state
    if cfg["smear"]:
        era = "head"
    elif ve_layers and cfg["ve_gate_channels"] == 12:
        era = "mar2026"
    elif ve_layers or cfg["lambdas"]:
        era = "jan2026"
    else:
        era = "launch"
    if "window_pattern" in meta_config:
        cfg["window_pattern"] = meta_config["window_pattern"]
    return era, cfg


def build_config(era: str, read: dict, overrides: dict, log=print) -> dict:
    """GPTConfig fields: what the file says, then the era's preset for the rest (printed), then the flags."""
    preset = PRESETS[era]
    cfg = dict(read)
    L = cfg["sequence_len"]
    for key in ("rotary_base", "rotary_dtype", "qk_scale", "window_pattern", "short_window", "ve_gate_scale",
                "logit_softcap"):
        if overrides.get(key) is not None:
            cfg[key] = overrides[key]
            log(f"set: {key} = {cfg[key]!r} (flag)")
            continue
        if key in cfg:
            continue
        value = 15.0 if key == "logit_softcap" else preset[key]
        cfg[key] = value(L) if callable(value) else value
        if key == "ve_gate_scale" and not cfg.get("ve_layers"):
            continue  # no value embeddings: the scale is unused
        if key == "short_window" and "S" not in cfg["window_pattern"].upper():
            continue  # no short layers: unused
        why = "not recorded"
        if key == "window_pattern":
            why = "no sliding windows then" if era == "launch" else "not in the meta (mid/SFT metas may omit it)"
        log(f"assumed: {key} = {cfg[key]!r} ({era} preset; {why})")
    return cfg


def convert(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """nanochat's names -> ours, the padded vocabulary rows dropped; tensors stay lazy (views of the mmap) and
    become fp32 one at a time as they are written."""
    V, n_layer = config.vocab_size, config.n_layer
    out = {}
    for key, t in state.items():
        if key.startswith("transformer.wte.") or key == "lm_head.weight" or key.startswith("value_embeds."):
            if t.size(0) < V:
                raise ImportFailed(f"{key} has {t.size(0)} rows, fewer than the vocabulary of {V}")
            t = t[:V]
        if key.startswith("transformer.h."):
            name = "blocks." + key.removeprefix("transformer.h.")
        elif key.startswith("transformer."):
            name = key.removeprefix("transformer.")
        else:
            name = key
        out[name] = t
    if "resid_lambdas" in out and out["resid_lambdas"].shape != (n_layer,):
        raise ImportFailed(f"resid_lambdas has shape {tuple(out['resid_lambdas'].shape)}, expected ({n_layer},)")
    return out


def check_shapes(state: dict[str, torch.Tensor], config) -> None:
    """Every tensor our model expects, with its shape, and nothing else."""
    expected = state_shapes(config)
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} != {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or extra or wrong:
        raise ImportFailed(f"the checkpoint does not match its meta: missing {missing[:5]}, unexpected {extra[:5]}, "
                           f"shapes {wrong[:3]}")


def import_checkpoint(src: str, out: Path, source: str | None = None, tag: str | None = None,
                      step: int | None = None, era: str | None = None, overrides: dict | None = None,
                      revision: str | None = None, force: bool = False, log=print) -> Path:

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    folder, step, tok_path = locate(src, source, tag, step, revision, log)
    log(f"checkpoint: {folder} step {step}; tokenizer: {tok_path}")
    meta_path = folder / f"meta_{step:06d}.json"
    try:
        meta = json.loads(meta_path.read_text())
        meta_config = meta["model_config"]
    except FileNotFoundError:
        raise MissingInputError(f"no {meta_path.name} beside {folder / f'model_{step:06d}.pt'}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ImportFailed(f"{meta_path} is not nanochat's meta JSON with a model_config ({e})") from None
    state = read_weights(folder / f"model_{step:06d}.pt")
    detected, read = detect(state, meta_config)
    if era is None:
        era = detected
        found = [k for k in ("ve_layers", "lambdas", "smear", "backout") if read.get(k)]
        log(f"era: {era} (from the keys: {', '.join(found) or 'plain GPT'})")
    elif era != detected:
        log(f"era: {era} (flag; the keys look like {detected})")
    tokenizer = load_tokenizer_pkl(tok_path)
    if tokenizer.vocab_size != read["vocab_size"]:
        raise ImportFailed(f"{tok_path} has {tokenizer.vocab_size} ids but the model's meta says vocab_size "
                           f"{read['vocab_size']}")
    fields = build_config(era, read, overrides or {}, log)
    try:
        config = GPTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ImportFailed(f"the checkpoint's config is not valid: {e}") from None
    padded = state["transformer.wte.weight"].size(0) if "transformer.wte.weight" in state else None
    if padded and padded != config.vocab_size:
        log(f"vocabulary: {padded} rows padded for speed; the {padded - config.vocab_size} extra rows are dropped")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    if dtypes != ["float32"]:
        log(f"weights stored as {', '.join(dtypes)}: converted to float32 (exact)")
    ours = convert(state, config)
    check_shapes(ours, config)
    stage = {"base_checkpoints": "base", "mid_checkpoints": "mid", "chatsft_checkpoints": "sft",
             "chatrl_checkpoints": "rl"}.get(folder.parent.name, "imported")
    hub_name = src.rsplit("/", 1)[-1] if not Path(src).expanduser().exists() else None
    info = {"stage": stage, "model_tag": hub_name or folder.name, "step": step, "commit": None,
            "imported_from": src, "nanochat_era": era}
    card = (f"\n## Imported\n\nConverted by `nanochat import` from `{src}` (step {step}), a checkpoint of Karpathy's "
            f"nanochat of the {era} era.\n")
    write_model_folder(out, ours, fields, tokenizer, info, {}, extra_card=card)
    n = sum(t.numel() for t in ours.values())
    log(f"imported {folder.name} step {step} ({n:,} parameters, era {era}) to {out}")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanochat import", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a nanochat checkpoint folder, a nanochat base dir, or a hub id (owner/name)")
    p.add_argument("--out", required=True, help="folder to write (our exported-model layout)")
    p.add_argument("--source", choices=list(STAGE_DIRS), default=None,
                   help="stage to import from a base dir (default: the most finished one present)")
    p.add_argument("--tag", default=None, help="model tag in the stage folder, e.g. d20 (default: the largest dN)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--era", choices=ERAS, default=None, help="override the detected architecture era")
    g = p.add_argument_group("overrides of the era's preset (what the file does not record)")
    g.add_argument("--rotary-base", type=float, default=None)
    g.add_argument("--rotary-dtype", choices=["float32", "bfloat16"], default=None,
                   help="bfloat16: rotary tables rounded to bf16, as nanochat computed them until March 2026")
    g.add_argument("--qk-scale", type=float, default=None, help="q and k multiplied by this after QK-norm")
    g.add_argument("--ve-gate-scale", type=float, default=None, help="value gate = scale x sigmoid(...)")
    g.add_argument("--window-pattern", default=None, help="S/L per layer, tiled (the last layer is always L)")
    g.add_argument("--short-window", type=int, default=None, help="window of S layers (keys i - w .. i)")
    g.add_argument("--softcap", dest="logit_softcap", type=float, default=None, help="logit soft-cap (default 15)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = {k: getattr(args, k) for k in OVERRIDES}
    try:
        import_checkpoint(args.src, Path(args.out), args.source, args.tag, args.step, args.era, overrides,
                          args.revision, args.force)
    except FileExistsError as e:
        print(f"nanochat import: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`selfattn explain --hf DIR`: every layer and head of a transformers model saved on disk.

The directory is what ``save_pretrained`` writes: ``config.json``, one or more ``*.safetensors``
files and, when present, the tokenizer's files. Everything that can be refused is refused
before the model is loaded (:func:`check_model_dir`): a path that is not a directory, no or an
unreadable ``config.json``, a ``model_type`` transformers does not know, no safetensors weights
(pickled ``pytorch_model.bin`` files are never loaded), a safetensors file whose header is
damaged or promises more bytes than the file holds, a model class that does not route its
attention through transformers' ``AttentionInterface`` (selfattn cannot serve it), and a model
whose float32 parameters and activations would not fit the memory this machine has available
(parameter counts come from the safetensors headers, read with ``struct`` and ``json``).

The model then runs once in float32 with ``attn_implementation="selfattn"``
(:mod:`selfattn.integrations.transformers`), nothing downloaded (both loaders are given
``local_files_only``; the command line also sets ``HF_HUB_OFFLINE=1``); every ``selfattn.attention`` call it makes is recorded with the module
that made it and becomes one layer of a :class:`~selfattn.explain.ModelTrace`, one trace per
query head -- the same object ``explain --checkpoint`` returns, with the same terminal, PNG,
HTML and JSON views.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .capture import AttentionCall
from .trace import FULL_MATRIX_MAX_TOKENS, MAX_TOKENS, LayerTrace, ModelTrace, default_rows, heads_of_call, parse_rows, split_indices

CONFIG_FILE = "config.json"
# bytes per element of each safetensors dtype (the format's own names)
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1}
# the safetensors library refuses headers above 100 MB
MAX_HEADER_BYTES = 100_000_000
# files that mean a tokenizer was saved with the model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# the options of the attention calls the per-head traces reproduce (others would be shown wrongly)
_TRACED_OPTIONS = ("mask", "causal", "window", "scale", "softcap", "sinks")
_REGISTERED_NAME = "selfattn"


class HFModelError(ValueError):
    """A directory that is not a transformers model selfattn can explain, said in one line."""


@dataclass
class ModelDir:
    """What :func:`check_model_dir` found, before anything is loaded."""

    path: Path
    config: dict  # config.json
    model_type: str  # config["model_type"]
    architecture: str  # the model class to build (config["architectures"][0], or AutoModel's choice)
    weights: list  # the safetensors files
    parameters: int  # elements over every tensor of every weights file
    weight_bytes: int  # their bytes as stored
    tokenizer: bool  # a tokenizer was saved beside the model


def read_safetensors_header(path: Path, what: str = "--hf") -> dict:
    """The header of a safetensors file (tensor name -> dtype, shape, data_offsets), checked against the file.

    Raises :class:`HFModelError` naming the file when the header is cut short, not JSON, not the
    format's layout, or points past the end of the file.
    """
    size = path.stat().st_size
    bad = f"{what}: {path} is not a readable safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFModelError(f"{bad}: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)  # little-endian u64: the JSON header's length
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise HFModelError(f"{bad}: its header claims {n:,} bytes but the file has {size:,} (damaged or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFModelError(f"{bad}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise HFModelError(f"{bad}: the header is a JSON {type(header).__name__}, not an object")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES and isinstance(entry.get("shape"), list) \
            and all(isinstance(s, int) and s >= 0 for s in entry["shape"]) and isinstance(entry.get("data_offsets"), list) \
            and len(entry["data_offsets"]) == 2 and all(isinstance(o, int) for o in entry["data_offsets"])
        if not ok:
            raise HFModelError(f"{bad}: tensor {name!r} has no valid dtype, shape and data_offsets ({str(entry)[:120]})")
        begin, end = entry["data_offsets"]
        numel = 1
        for s in entry["shape"]:
            numel *= s
        if not 0 <= begin <= end <= data or end - begin != numel * SAFETENSORS_DTYPES[entry["dtype"]]:
            raise HFModelError(f"{bad}: tensor {name!r} ({entry['dtype']} {entry['shape']}) lies at bytes {begin}..{end} "
                               f"of a {data:,}-byte data section (the file is cut short or damaged)")
    return header


def _tensor_sizes(header: dict) -> tuple:
    numel = nbytes = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for s in entry["shape"]:
            n *= s
        numel += n
        nbytes += n * SAFETENSORS_DTYPES[entry["dtype"]]
    return numel, nbytes


def _transformers(what: str):
    try:
        import transformers
    except ImportError:
        raise HFModelError(f"{what} needs transformers, which is not installed: pip install 'selfattn[hf]'") from None
    return transformers


def _model_class(model_type: str, config: dict, what: str):
    transformers = _transformers(what)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise HFModelError(f"{what}: config.json has model_type {model_type!r}, which transformers "
                           f"{transformers.__version__} does not know")
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        cls = getattr(transformers, archs[0], None)
        if cls is None:
            raise HFModelError(f"{what}: config.json names the architecture {archs[0]!r}, which transformers "
                               f"{transformers.__version__} does not have")
        return cls
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise HFModelError(f"{what}: config.json names no 'architectures' and transformers has no model class for "
                           f"model_type {model_type!r}")
    return cls


def _calls_attention_interface(cls) -> bool:
    """Whether the model's attention goes through transformers' registry of implementations (the test
    transformers itself applies before letting a model switch implementation: its source looks it up)."""
    import inspect
    import sys

    if getattr(cls, "_supports_attention_backend", False):
        return True
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return False


def check_model_dir(path, what: str = "--hf") -> ModelDir:
    """Every check that needs no model loaded; returns what was found or raises :class:`HFModelError`."""
    p = Path(path)
    if not p.exists():
        raise HFModelError(f"{what} {path}: does not exist (give the directory save_pretrained wrote)")
    if not p.is_dir():
        raise HFModelError(f"{what} {path}: is a file, not a directory (give the directory save_pretrained wrote, "
                           "holding config.json and *.safetensors)")
    cfg = p / CONFIG_FILE
    if not cfg.is_file():
        raise HFModelError(f"{what} {path}: has no config.json, so it is not a saved transformers model")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFModelError(f"{what}: {cfg} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        hint = " (a selfattn checkpoint: use --checkpoint)" if isinstance(config, dict) and config.get("format") == "selfattn-checkpoint" else ""
        raise HFModelError(f"{what}: {cfg} is not a transformers config: its 'model_type' is {got!r}{hint}")
    model_type = config["model_type"]
    cls = _model_class(model_type, config, what)
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        pickled = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        extra = (f"; it has {', '.join(pickled)} (pickle files, which selfattn never loads: re-save with "
                 "save_pretrained(..., safe_serialization=True))") if pickled else ""
        raise HFModelError(f"{what} {path}: has no *.safetensors weights file{extra}")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HFModelError(f"{what}: {index} is not a valid safetensors index ({e!r})") from None
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise HFModelError(f"{what} {path}: the index names weight files that are not there: {missing[:5]}")
    numel = nbytes = 0
    for w in weights:
        n, b = _tensor_sizes(read_safetensors_header(w, what))
        numel, nbytes = numel + n, nbytes + b
    if not _calls_attention_interface(cls):
        raise HFModelError(f"{what} {path}: {cls.__name__} does not call transformers' AttentionInterface "
                           "(attn_implementation), so selfattn cannot serve its attention to trace it")
    tokenizer = any((p / f).is_file() for f in TOKENIZER_FILES)
    return ModelDir(p, config, model_type, cls.__name__, weights, numel, nbytes, tokenizer)


def memory_needed(md: ModelDir, n_tokens: int) -> int:
    """Bytes the run needs, estimated before loading: float32 weights (plus the stored tensors while
    they are copied in), the forward's activations and the recorded per-head traces."""
    c = md.config
    text = c.get("text_config") if isinstance(c.get("text_config"), dict) else c
    hidden = int(text.get("hidden_size") or text.get("n_embd") or text.get("d_model") or 1024)
    layers = _layer_count(c)
    heads = int(text.get("num_attention_heads") or text.get("n_head") or 1)
    vocab = int(text.get("vocab_size") or 0)
    inner = int(text.get("intermediate_size") or 4 * hidden)
    L = n_tokens
    weights = 4 * md.parameters + md.weight_bytes
    activations = 4 * L * (8 * hidden + 2 * inner) + 4 * L * vocab + 4 * layers * L * 4 * hidden  # + recorded q, k, v, out
    if L <= FULL_MATRIX_MAX_TOKENS:  # every head's float64 steps, L x L and L x d
        traces = layers * heads * 8 * (6 * L * L + 4 * L * max(1, hidden // heads))
    else:  # statistics and picked rows; the pattern scan recomputes rows in chunks
        traces = layers * heads * 8 * (3 * L) + 8 * 256 * L * heads
    return int(1.2 * (weights + activations + traces))


def _token_ids(md: ModelDir, text, ids, what: str):
    """(ids (1, L) int64, token labels, the tokenizer or None)."""
    vocab = _vocab_size(md.config)
    if ids is not None:
        if text is not None:
            raise HFModelError("give TEXT or --ids, not both")
        if isinstance(ids, str):
            try:
                ids = [int(s) for s in ids.replace(",", " ").split()]
            except ValueError:
                raise HFModelError(f"--ids must be integers separated by commas or spaces, got {ids!r}") from None
        ids = list(ids)
        if not ids:
            raise HFModelError("--ids is empty: give at least one token id")
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0 or (vocab and i >= vocab)]
        if bad:
            raise HFModelError(f"--ids: {bad[:5]} out of range: the model's vocabulary has {vocab} tokens (ids 0..{vocab - 1})")
    tok = None
    if md.tokenizer:
        tok = _load_tokenizer(md, what)
    if ids is None:
        if text is None:
            raise HFModelError(f"{what} needs a TEXT (or --ids) to run the model on")
        if tok is None:
            raise HFModelError(f"{what} {md.path}: has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}), so TEXT cannot become "
                               "token ids; give them with --ids, e.g. --ids 1,5,9")
        ids = tok(text)["input_ids"]
        if not ids:
            raise HFModelError(f"the tokenizer makes no tokens of {text!r}")
    if len(ids) > MAX_TOKENS:
        raise HFModelError(f"the input has {len(ids)} tokens; selfattn explain takes at most {MAX_TOKENS} (full matrices up to "
                           f"{FULL_MATRIX_MAX_TOKENS}, statistics and chosen rows beyond)")
    limit = md.config.get("max_position_embeddings") or md.config.get("n_positions")
    if isinstance(limit, int) and len(ids) > limit:
        raise HFModelError(f"the input has {len(ids)} tokens but the model takes at most {limit} (max_position_embeddings)")
    labels = [tok.decode([i]) for i in ids] if tok is not None else [str(i) for i in ids]
    return torch.tensor([ids], dtype=torch.long), labels, tok


def _layer_count(config: dict) -> int:
    c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    n = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
    return n if isinstance(n, int) and n > 0 else 1


def _vocab_size(config: dict) -> int:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    v = text.get("vocab_size")
    return v if isinstance(v, int) else 0


def _load_tokenizer(md: ModelDir, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(md.path), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, or the tokenizer library's own errors
        text = " ".join(str(e).split())[:300]
        raise HFModelError(f"{what} {md.path}: its tokenizer files cannot be loaded ({type(e).__name__}: {text}); "
                           "remove them and give --ids instead") from None


def _load_model(md: ModelDir, what: str):
    import selfattn.integrations.transformers as sa_hf

    sa_hf.register(_REGISTERED_NAME)
    import transformers

    cls = getattr(transformers, md.architecture)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # the command line shows its own
    try:
        model, info = cls.from_pretrained(str(md.path), attn_implementation=_REGISTERED_NAME, local_files_only=True,
                                          dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        text = " ".join(str(e).split())[:300]
        raise HFModelError(f"{what} {md.path}: transformers cannot load this model ({type(e).__name__}: {text})") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise HFModelError(f"{what} {md.path}: the weights files lack {len(missing)} of the model's tensors "
                           f"(e.g. {sorted(missing)[:3]}); explaining randomly initialised weights would mislead")
    if any(t.dtype != torch.float32 for t in model.parameters()):
        model = model.float()  # the report is in float32 whatever dtype the weights were saved in
    return model.eval()


def parse_layers(spec, n: int) -> list:
    """Layer indices from a list of ints or a string like "0,3-5,-1" (negative counts from the end)."""
    if isinstance(spec, str):
        items = split_indices(spec, "--layers must be indices like '0,3-5,-1'", HFModelError)
    else:
        items = list(spec)
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise HFModelError(f"--layers must be integers, got {i!r}")
        if not -n <= i < n:
            raise HFModelError(f"--layers: layer {i} is out of range: the model has {n} attention layers (0..{n - 1}, or -1 for the last)")
        if i % n not in out:
            out.append(i % n)
    if not out:
        raise HFModelError(f"--layers {spec!r} names no layer")
    return sorted(out)


def explain_hf(path, text: str | None = None, *, ids=None, rows=None, layers=None, what: str = "--hf", progress=None,
               check=None) -> ModelTrace:
    """Every attention layer and head of the transformers model saved in ``path``, run on ``text`` or ``ids``.

    Args:
        path: a directory written by ``save_pretrained`` (config.json + safetensors; its
            tokenizer is used when present). Nothing is downloaded.
        text: the input, tokenized by the model's own tokenizer (as the model is used: special
            tokens such as BOS included).
        ids: token ids instead of text (a list of ints, or a string "1,5,9"): for a model saved
            without a tokenizer.
        rows: query rows to pick out, as for :func:`selfattn.explain.explain`; beyond
            ``FULL_MATRIX_MAX_TOKENS`` tokens only these rows' weights are computed.
        layers: which attention layers to trace and show (indices in call order, or a string
            like "0,3-5,-1"; default all): a model with many heads makes long reports.
        what: how errors name the directory argument ("--hf" on the command line).
        progress: optional ``progress(stage, done, total)`` callback for a progress display.
        check: optional ``check(model_dir, n_tokens, rows)``, called before the model is loaded
            (the command line refuses oversized outputs there).

    Returns:
        :class:`~selfattn.explain.ModelTrace`: one layer per attention call (named by its
        module, e.g. ``model.layers.0.self_attn``), one trace per query head. Weights are
        exactly what the model's softmax gives (the same as ``output_attentions`` of eager).

    Raises:
        HFModelError: (a ``ValueError``) for anything refused, before the model is loaded
            whenever the directory alone shows it.
    """
    from .. import monitor
    from .._cliutil import check_memory

    report = progress or (lambda stage, done, total: None)
    md = check_model_dir(path, what)
    x, tokens, tok = _token_ids(md, text, ids, what)
    L = x.shape[1]
    picked = parse_rows(rows, L) or default_rows(L)
    check_memory(memory_needed(md, L), f"{what} {md.path} ({md.parameters:,} parameters, {L} tokens)",
                 "explain a smaller model, or fewer tokens, on this machine")
    expected = _layer_count(md.config)
    if layers is not None and not md.config.get("is_encoder_decoder"):  # (encoder-decoders make more calls than layers)
        parse_layers(layers, expected)  # refused before loading when the config already rules it out
    if check is not None:
        check(md, L, picked)
    report("loading the model", 0, 1)
    model = _load_model(md, what)
    report("loading the model", 1, 1)
    calls: list = []
    kwargs = {"input_ids": x}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = x

    def record(call):  # one attention call per layer: the forward's progress
        calls.append(call)
        report("running the model (attention calls)", len(calls), max(expected, len(calls)))

    report("running the model (attention calls)", 0, expected)
    with monitor.observe(record, model), torch.no_grad():
        try:
            result = model(**kwargs)
        except NotImplementedError as e:  # the integration refuses an argument by name
            raise HFModelError(f"{what} {md.path}: {' '.join(str(e).split())}") from None
    if not calls:
        raise HFModelError(f"{what} {md.path}: the model ({md.architecture}) made no attention calls through selfattn: "
                           "nothing to show")
    options = {"checkpoint": str(md.path), "model": md.architecture, "tokenizer": "its own" if tok is not None else "no",
               "source": "transformers"}
    chosen = parse_layers(layers, len(calls)) if layers is not None else list(range(len(calls)))
    traced = []
    for n, i in enumerate(chosen):
        c = calls[i]
        report("tracing every head", n, len(chosen))
        extra = [n for n, v in c.options.items() if n not in _TRACED_OPTIONS and v is not None]
        if extra:
            raise HFModelError(f"{what} {md.path}: {c.name} calls attention with {', '.join(extra)}, which the per-head "
                               "report cannot show yet")
        kind = type(c.module).__name__ if c.module is not None else md.architecture
        call = AttentionCall(c.name, kind, c.query, c.key, c.value, c.options, c.output, c.stats)
        opts = dict(options, causal=bool(c.options.get("causal")), window=c.options.get("window"))
        traced.append(LayerTrace(c.name or f"call {i}", kind, heads_of_call(tokens, call, picked, opts, prefix=f"{c.name} "), i))
    report("tracing every head", len(chosen), len(chosen))
    return ModelTrace(tokens, traced, options, _predictions(result, tok, _vocab_size(md.config)))


def _predictions(result, tok, vocab: int) -> list:
    """Per position the most likely next tokens, when the model's output is next-token logits (else [])."""
    from .trace import TOP_PREDICTIONS

    logits = getattr(result, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] != 1 or logits.shape[-1] != vocab:
        return []
    probs = torch.softmax(logits[0].to(torch.float64), dim=-1)  # (L, V)
    top = torch.topk(probs, min(TOP_PREDICTIONS, vocab), dim=-1)
    name = (lambda j: tok.decode([j])) if tok is not None else str
    return [[(name(int(j)), float(p)) for p, j in zip(ps, js)] for ps, js in zip(top.values, top.indices)]


def json_numbers(md: ModelDir, n_tokens: int, n_rows: int = 3, layers=None) -> int:
    """About how many numbers ``--json`` writes for this model and input (every head's steps of the chosen layers)."""
    c = md.config.get("text_config") if isinstance(md.config.get("text_config"), dict) else md.config
    n = _layer_count(md.config)
    try:
        layers = n if layers is None else len(parse_layers(layers, n))
    except HFModelError:  # an encoder-decoder's calls outnumber its layers: judged after the forward
        layers = n
    heads = int(c.get("num_attention_heads") or c.get("n_head") or 1)
    hidden = int(c.get("hidden_size") or c.get("n_embd") or 64)
    d = int(c.get("head_dim") or max(1, hidden // heads))
    L = n_tokens
    per_head = 4 * L * d + 3 * L + (5 * L * L if L <= FULL_MATRIX_MAX_TOKENS else 2 * n_rows * L)  # Q, K, V, output; stats; L x L steps or rows
    return layers * heads * per_head

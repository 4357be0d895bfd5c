"""Checkpoints: a model's weights as safetensors plus a JSON config (never pickle).

Format (version 1). A checkpoint is a directory holding two files:

    model.safetensors   every tensor of the model's ``state_dict``, by its state-dict name
    config.json         {
                          "format": "selfattn-checkpoint",
                          "version": 1,
                          "model": {"type": "<registered model type>", ...},
                          "vocab": ["<token 0>", "<token 1>", ...],   (optional)
                          "tokenizer": "words" | "chars",             (optional, default "words")
                          ...                                          (anything else, e.g. training
                                                                        state: readers ignore it)
                        }

``model`` is the keyword arguments of the model's builder plus ``"type"``, the name it was
registered under with :func:`register_model`, and optionally ``"module"``: a ``selfattn.*``
module to import first so that its models register themselves. ``vocab[i]`` is the token whose
id is ``i``; ``tokenizer`` names how text becomes tokens (``selfattn.explain.tokenize``: "words"
= words and single punctuation marks, "chars" = one token per character).

A path given to :func:`load` may be the directory or either of its two files. Every problem
(missing file, invalid JSON, wrong format or version, corrupt safetensors, unknown model
type, tensors that do not fit the model) raises :class:`CheckpointError` (a ``ValueError``)
naming the file and what is wrong. Version bumps are for incompatible changes only; new
optional keys keep version 1. :meth:`Checkpoint.build` gives the model in its weights' floating
dtype (a float64 checkpoint builds a float64 model) and refuses a ``vocab`` of another size than
the model's.

``selfattn train`` adds a third file, ``training.safetensors`` (optimizer and RNG state), and a
``"training"`` entry (step, options, ...; :mod:`selfattn.training.state`). Its ``save_id`` (the
step and a digest of the tensors) is also in the safetensors metadata of both files
(``selfattn_save_id``): the files are replaced one by one, and ``--resume`` refuses files of two
different saves.

The model classes live in :mod:`selfattn.model`, which registers two types: ``"attention-stack"``
(:class:`selfattn.model.AttentionStack`: an embedding followed by ``SelfAttention`` /
``MultiHeadAttention`` layers) and ``"transformer"`` (what ``selfattn train`` writes). Loading
either imports :mod:`selfattn.model` on demand; other models register their own type.

Example:
    >>> from selfattn.model import AttentionStack
    >>> model = AttentionStack(vocab_size=3, embed_dim=8, layers=[{"type": "MultiHeadAttention", "num_heads": 2}])
    >>> save("ckpt", model, model.config, vocab=["a", "b", "c"])
    >>> ckpt = load("ckpt"); model = ckpt.build()
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

FORMAT = "selfattn-checkpoint"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZERS = ("words", "chars")

_BUILDERS: dict = {}
# built-in model types and the module that registers each (imported when a checkpoint needs it)
_BUILTIN_MODULES = {"attention-stack": "selfattn.model", "transformer": "selfattn.model"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not describe a model we can build."""


def register_model(name: str):
    """Decorator: ``@register_model("transformer")`` on a builder ``f(**model_config) -> nn.Module``."""
    def deco(builder):
        _BUILDERS[name] = builder
        return builder
    return deco


def model_types() -> list:
    return sorted(set(_BUILDERS) | set(_BUILTIN_MODULES))


@dataclass
class Checkpoint:
    path: Path  # the checkpoint directory
    config: dict  # the whole config.json
    state_dict: dict  # tensor name -> tensor, from model.safetensors
    model_config: dict = field(default_factory=dict)  # config["model"]
    vocab: list | None = None  # token strings, index = id
    tokenizer: str = "words"  # "words" or "chars"

    def build(self, *, strict: bool = True) -> nn.Module:
        """The model described by ``config["model"]``, with these weights loaded, in eval mode."""
        return build_model(self, strict=strict)


def _paths(path) -> tuple:
    p = Path(path)
    if p.is_dir():
        return p, p / WEIGHTS_FILE, p / CONFIG_FILE
    if p.name in (WEIGHTS_FILE, CONFIG_FILE):
        return p.parent, p.parent / WEIGHTS_FILE, p.parent / CONFIG_FILE
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {str(path)!r} does not exist "
                              f"(expected a directory holding {WEIGHTS_FILE} and {CONFIG_FILE})")
    raise CheckpointError(f"{str(path)!r} is not a checkpoint: give a directory holding {WEIGHTS_FILE} and {CONFIG_FILE}, or one of those files")


def _state_dict(model_or_tensors) -> dict:
    sd = model_or_tensors.state_dict() if isinstance(model_or_tensors, nn.Module) else dict(model_or_tensors)
    out = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = t.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage (tied weights)
    return out


def save(path, model, model_config: dict, *, vocab=None, tokenizer: str | None = None, extra: dict | None = None,
         metadata: dict | None = None) -> Path:
    """Write ``model`` (an ``nn.Module`` or a dict of tensors) and its config as a checkpoint directory.

    Args:
        path: the directory to write (created if needed; its two files are replaced).
        model: the module whose ``state_dict`` is saved, or the state dict itself.
        model_config: JSON-ready dict with ``"type"`` (a registered model type) and the
            builder's keyword arguments.
        vocab: token strings, index = id (optional).
        tokenizer: "words" or "chars" (optional; readers default to "words").
        extra: more JSON-ready top-level keys (for example training state).
        metadata: more string entries for the safetensors header of the weights file.

    Returns the directory's path.
    """
    from safetensors.torch import save_file

    if not isinstance(model_config, dict) or not isinstance(model_config.get("type"), str):
        raise ValueError(f"model_config must be a dict with a 'type' string, got {model_config!r}")
    if tokenizer is not None and tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if vocab is not None and (not isinstance(vocab, (list, tuple)) or not all(isinstance(t, str) for t in vocab)):
        raise TypeError("vocab must be a list of strings (index = token id)")
    config = dict(extra or {})
    config.update({"format": FORMAT, "version": VERSION, "model": dict(model_config)})
    if vocab is not None:
        config["vocab"] = list(vocab)
    if tokenizer is not None:
        config["tokenizer"] = tokenizer
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    meta = {**{str(k): str(v) for k, v in (metadata or {}).items()}, "format": FORMAT, "version": str(VERSION)}
    save_file(_state_dict(model), str(d / WEIGHTS_FILE), metadata=meta)
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return d


def load(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save` (the directory, or either of its files)."""
    from safetensors.torch import load_file

    d, weights, cfg = _paths(path)
    for f in (cfg, weights):
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(d)!r} has no {f.name} (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        config = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{cfg} is not a selfattn checkpoint config: 'format' is {got!r}, expected {FORMAT!r}")
    version = config.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise CheckpointError(f"{cfg} has version {version!r}; this selfattn reads versions 1..{VERSION}")
    model_config = config.get("model")
    if not isinstance(model_config, dict) or not isinstance(model_config.get("type"), str):
        raise CheckpointError(f"{cfg}: 'model' must be an object with a 'type' string, got {model_config!r}")
    vocab = config.get("vocab")
    if vocab is not None and (not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab)):
        raise CheckpointError(f"{cfg}: 'vocab' must be a list of strings")
    tokenizer = config.get("tokenizer", "words")
    if tokenizer not in TOKENIZERS:
        raise CheckpointError(f"{cfg}: 'tokenizer' must be one of {TOKENIZERS}, got {tokenizer!r}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type (and OSError) for damaged files
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    return Checkpoint(d, config, state, model_config, vocab, tokenizer)


def build_model(ckpt: Checkpoint, *, strict: bool = True) -> nn.Module:
    """Build ``ckpt``'s model from its registered type and load its weights (eval mode)."""
    cfg = dict(ckpt.model_config)
    kind = cfg.pop("type")
    module = cfg.pop("module", None)
    if kind not in _BUILDERS and kind in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[kind])
    if kind not in _BUILDERS and module is not None:
        if not (isinstance(module, str) and module.startswith("selfattn.")):
            raise CheckpointError(f"{ckpt.path / CONFIG_FILE}: 'module' must name a selfattn.* module, got {module!r}")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise CheckpointError(f"{ckpt.path / CONFIG_FILE}: cannot import model module {module!r}: {e}") from None
    if kind not in _BUILDERS:
        raise CheckpointError(f"{ckpt.path / CONFIG_FILE}: unknown model type {kind!r}; known types: {model_types()}")
    try:
        model = _BUILDERS[kind](**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path / CONFIG_FILE}: cannot build a {kind!r} model from {cfg}: {e}") from None
    # the model in the weights' own floating dtype: a float64 run (selfattn train --dtype float64) must not
    # come back as a float32 model with its weights rounded by load_state_dict's copy
    dtypes = {t.dtype for t in ckpt.state_dict.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtype=dtypes.pop())
    try:
        model.load_state_dict(ckpt.state_dict, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path / WEIGHTS_FILE} does not fit the {kind!r} model of {CONFIG_FILE}: {e}") from None
    # a vocabulary of another size than the model's: token ids past its end have no text (sample would fail
    # on the first such id drawn), and text tokens would map to the wrong rows
    n = getattr(getattr(model, "config", None), "vocab_size", None) or getattr(model, "vocab_size", None)
    if ckpt.vocab is not None and isinstance(n, int) and len(ckpt.vocab) != n:
        raise CheckpointError(f"{ckpt.path / CONFIG_FILE}: 'vocab' has {len(ckpt.vocab)} tokens, the {kind!r} model {n}")
    return model.eval()


def __getattr__(name):
    # AttentionStack lived here before it moved to selfattn.model with the other model classes
    if name == "AttentionStack":
        from .model import AttentionStack

        return AttentionStack
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

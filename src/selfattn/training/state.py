"""Training state on disk without pickle: optimizer tensors and RNG states in safetensors, scalars in JSON.

A training checkpoint is a :mod:`selfattn.checkpoint` directory (``model.safetensors`` +
``config.json``, readable by ``selfattn explain`` and ``selfattn sample``) plus one more file:

    training.safetensors   "optimizer.<param index>.<name>" -- every tensor of the optimizer's
                           state (AdamW: step, exp_avg, exp_avg_sq);
                           "rng.torch" -- torch's CPU generator state (uint8);
                           "rng.cuda.<i>" -- each CUDA generator's state, when there is CUDA

and, in config.json, a ``"training"`` object: the step reached, the training options, the
optimizer's non-tensor state and hyper-parameters (``param_groups``), elapsed time and tokens.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from .. import checkpoint as _checkpoint

TRAINING_FILE = "training.safetensors"
SAVE_ID = "selfattn_save_id"  # safetensors metadata key of both files, = config.json's training.save_id


def _json_ready(v):
    if isinstance(v, tuple):
        return [_json_ready(x) for x in v]
    if isinstance(v, list):
        return [_json_ready(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_ready(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def optimizer_to_safe(opt: torch.optim.Optimizer) -> tuple:
    """(tensors, json) for an optimizer: state tensors by name, everything else JSON-ready."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = _json_ready(v)
    return tensors, {"type": type(opt).__name__, "param_groups": _json_ready(sd["param_groups"]), "scalars": scalars}


def optimizer_from_safe(opt: torch.optim.Optimizer, tensors: dict, meta: dict, where: str) -> None:
    """Load what :func:`optimizer_to_safe` wrote into ``opt`` (same parameters, same order)."""
    if not isinstance(meta, dict) or meta.get("type") != type(opt).__name__:
        got = meta.get("type") if isinstance(meta, dict) else meta
        raise _checkpoint.CheckpointError(f"{where}: optimizer state is for {got!r}, this run uses {type(opt).__name__}")
    state: dict = {}
    for name, t in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise _checkpoint.CheckpointError(f"{where}: optimizer state does not fit this model: {e}") from None
    # load_state_dict takes a per-parameter state with a tensor missing or of another shape; the first
    # optimizer step would then fail with a KeyError or a broadcast error. Every parameter's state must have
    # the same entries, each a scalar or a tensor of the parameter's shape.
    params = [p for g in opt.param_groups for p in g["params"]]
    keys = set().union(*(opt.state.get(p, {}) for p in params)) if params else set()
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        if set(st) != keys:
            lacks = ", ".join(f"optimizer.{i}.{k}" for k in sorted(keys - set(st)))
            raise _checkpoint.CheckpointError(f"{where}/{TRAINING_FILE}: damaged optimizer state: {lacks} missing "
                                              f"(the other parameters have {sorted(keys)})")
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise _checkpoint.CheckpointError(f"{where}/{TRAINING_FILE}: damaged optimizer state: optimizer.{i}.{key} "
                                                  f"has shape {tuple(v.shape)}, its parameter {tuple(p.shape)}")


def rng_to_safe() -> dict:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def rng_from_safe(tensors: dict, where: str = "checkpoint") -> None:
    if "rng.torch" in tensors:
        try:
            torch.set_rng_state(tensors["rng.torch"])
        except (RuntimeError, TypeError) as e:
            raise _checkpoint.CheckpointError(f"{where}/{TRAINING_FILE}: damaged RNG state 'rng.torch': {e}") from None
    if torch.cuda.is_available():
        states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save(path, model, model_config: dict, *, vocab, tokenizer: str, training: dict, optimizer) -> Path:
    """Write a training checkpoint: files go to a scratch directory first, then replace the old ones."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ".partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    opt_tensors, opt_meta = optimizer_to_safe(optimizer)
    # one id in all three files: they are replaced one by one below, and a save killed between two
    # replacements leaves files of two saves, which load() refuses to resume
    save_id = f"{training.get('step')}-{_digest(model, opt_tensors)}"  # of the content: equal runs write equal files
    training = dict(training, optimizer=opt_meta, save_id=save_id)
    _checkpoint.save(tmp, model, model_config, vocab=vocab, tokenizer=tokenizer, extra={"training": training},
                     metadata={SAVE_ID: save_id})
    save_file({**opt_tensors, **rng_to_safe()}, str(tmp / TRAINING_FILE),
              metadata={"format": _checkpoint.FORMAT, SAVE_ID: save_id})
    for name in (_checkpoint.WEIGHTS_FILE, TRAINING_FILE, _checkpoint.CONFIG_FILE):  # config last: it names the step
        os.replace(tmp / name, d / name)
    tmp.rmdir()
    return d


def load(path) -> tuple:
    """(Checkpoint, training dict, training tensors) of a training checkpoint; CheckpointError otherwise."""
    from safetensors.torch import load_file

    ckpt = _checkpoint.load(path)
    cfg_file = ckpt.path / _checkpoint.CONFIG_FILE
    if ckpt.model_config.get("type") != "transformer":
        raise _checkpoint.CheckpointError(f"{cfg_file}: model type {ckpt.model_config.get('type')!r} was not written by "
                                          "selfattn train (expected 'transformer'); it cannot be resumed")
    training = ckpt.config.get("training")
    step = training.get("step") if isinstance(training, dict) else None
    if (not isinstance(step, int) or isinstance(step, bool) or step < 0
            or not isinstance(training.get("options"), dict)):
        raise _checkpoint.CheckpointError(f"{cfg_file} has no valid 'training' entry (step and options): it can be "
                                          "explained or sampled but not resumed")
    vocab_size = ckpt.model_config.get("vocab_size")
    if ckpt.vocab is not None and len(ckpt.vocab) != vocab_size:
        raise _checkpoint.CheckpointError(f"{cfg_file}: 'vocab' has {len(ckpt.vocab)} tokens, the model {vocab_size!r}")
    f = ckpt.path / TRAINING_FILE
    if not f.is_file():
        raise _checkpoint.CheckpointError(f"checkpoint {str(ckpt.path)!r} has no {TRAINING_FILE} (optimizer and RNG state): "
                                          "it can be explained or sampled but not resumed")
    try:
        tensors = load_file(str(f))
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise _checkpoint.CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    want = training.get("save_id")
    if want is not None:  # checkpoints written before save ids have none: nothing to compare
        for file in (ckpt.path / _checkpoint.WEIGHTS_FILE, f):
            got = _save_id(file)
            if got != want:
                raise _checkpoint.CheckpointError(
                    f"{file} is from another save than {cfg_file} (save id {got!r}, config {want!r}): a save was "
                    "interrupted between its files; resume from an earlier copy or start again")
    return ckpt, training, tensors


def _digest(model, tensors: dict) -> str:
    h = hashlib.sha256()
    for name, t in sorted({**{f"model.{k}": v for k, v in model.state_dict().items()}, **tensors}.items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _save_id(file) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            return (fh.metadata() or {}).get(SAVE_ID)
    except Exception:  # unreadable: load() already read it once; say 'another save'
        return None

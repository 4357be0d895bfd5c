"""Attention statistics from any model: which module made each call, and a monitor over a loop.

:func:`observe` is :func:`selfattn.functional.observe` plus the module that made the call. It
tracks the module being run with forward pre-/post-hooks (on ``model``'s modules, or on every
module while the context is active when no model is given) and hands the callback an
:class:`AttentionCall`: the layer's name (``model.layers.3.self_attn``), its index (0, 1, ...
in the order the calling modules first ran in this context, which is layer order for a stack of
layers), and the call's tensors, options and statistics. Statistics come from the fused kernels'
online softmax, so observing costs little beyond the call itself.

    with selfattn.observe(lambda call: print(call.name, call.stats.entropy.mean()), model):
        model(input_ids)

:class:`Monitor` keeps, per step, each layer's per-head mean entropy and max logit (mean and
largest over batch and queries) and draws them as ``selfattn train`` draws its run:

    monitor = selfattn.monitor.Monitor(model)
    for step, batch in enumerate(loader):
        with monitor.collect(step):               # statistics of the forwards inside
            loss = model(**batch).loss
        monitor.record(loss=loss.item())          # optional: the loss panel of the plot
        ...
    monitor.plot("attention.png")                 # needs matplotlib: pip install 'selfattn[cli]'

Works for transformers models through ``selfattn.integrations.transformers`` and for models
built from selfattn's layers. Calls made under ``torch.compile`` are not observed.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field

import torch

from . import functional as _functional
from .stats import AttentionStats

# the modules whose forward is running, innermost last (per context: threads and tasks apart)
_STACK: contextvars.ContextVar[tuple] = contextvars.ContextVar("selfattn_module_stack", default=())


@dataclass
class AttentionCall:
    """One :func:`selfattn.attention` call, as an :func:`observe` callback sees it."""

    name: str  # qualified name of the innermost running module ("" for the model itself; its class name without a model)
    index: int  # 0, 1, ...: order in which calling modules first ran in this context (-1: no module)
    module: torch.nn.Module | None  # the module itself (None when called outside any module)
    query: torch.Tensor  # (B, Hq, Lq, D)
    key: torch.Tensor  # (B, Hkv, Lk, D)
    value: torch.Tensor  # (B, Hkv, Lk, Dv)
    options: dict  # the call's mask, causal, window, scale, softcap, positions, alibi_slopes, sinks
    output: torch.Tensor  # (B, Hq, Lq, Dv)
    stats: AttentionStats  # lse, max_logit, entropy: each (B, Hq, Lq)


def _pre_hook(module, args):
    _STACK.set(_STACK.get() + (module,))


def _post_hook(module, args, output):
    stack = _STACK.get()
    if stack and stack[-1] is module:
        _STACK.set(stack[:-1])


@contextlib.contextmanager
def observe(callback, model: torch.nn.Module | None = None):
    """While active, ``callback(call: AttentionCall)`` runs after every ``selfattn.attention`` call.

    Args:
        callback: called with an :class:`AttentionCall` (layer name and index, tensors, options,
            statistics); statistics are computed for it even when the caller did not ask for them.
        model: the module tree whose names the calls get (``named_modules``). Without it every
            module run in this context is tracked and named by its class.
    """
    names: dict[int, str] = {}
    handles = []
    if model is not None:
        for name, mod in model.named_modules():
            names[id(mod)] = name
            handles.append(mod.register_forward_pre_hook(_pre_hook))
            handles.append(mod.register_forward_hook(_post_hook, always_call=True))
    else:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        handles.append(register_module_forward_pre_hook(_pre_hook))
        handles.append(register_module_forward_hook(_post_hook, always_call=True))
    order: dict[int, int] = {}

    def on_call(query, key, value, options, output, stats):
        stack = _STACK.get()
        module = stack[-1] if stack else None
        if module is None:
            name, index = "", -1
        else:
            name = names.get(id(module), type(module).__name__)
            index = order.setdefault(id(module), len(order))
        callback(AttentionCall(name, index, module, query, key, value, options, output, stats))

    token = _STACK.set(())
    try:
        with _functional.observe(on_call):
            yield
    finally:
        _STACK.reset(token)
        for h in handles:
            h.remove()


@dataclass
class _Row:
    step: int
    sums: dict = field(default_factory=dict)  # layer index -> [entropy sum (H,), max_logit sum (H,), max_logit max (H,), rows]


class Monitor:
    """Per-layer, per-head attention entropy and max logit over a training or evaluation loop.

    ``rows`` holds one dict per collected step, in ``selfattn train``'s log format:
    ``{"step", "loss", "acc", "heads": [layer][head] -> {"entropy", "max_logit", "max_logit_max"}}``
    (means over batch and query rows; ``max_logit_max`` the largest); ``layers`` the layer names
    in index order. Fully-masked query rows (max logit -inf) are left out of the means.
    """

    def __init__(self, model: torch.nn.Module | None = None):
        self.model = model
        self.layers: list[str] = []
        self.rows: list[dict] = []
        self._row: _Row | None = None

    @contextlib.contextmanager
    def collect(self, step: int | None = None):
        """Observe the attention calls inside; they form the row of ``step`` (default: next number)."""
        if self._row is not None:
            raise RuntimeError(f"Monitor.collect: already collecting step {self._row.step}; collect() does not nest "
                               "(one `with monitor.collect(step):` per step)")
        self._row = _Row(len(self.rows) if step is None else int(step))
        try:
            with observe(self._on_call, self.model):
                yield self
        except BaseException:
            self._row = None  # a failed step (a skipped batch, Ctrl-C) leaves no half row for the next one to join
            raise
        self._close()

    def record(self, *, loss: float | None = None, acc: float | None = None) -> None:
        """Attach a loss (and accuracy) to the last collected row, for the plot's first panel."""
        if not self.rows:
            raise ValueError("Monitor.record: no step collected yet (use `with monitor.collect(step): ...` first)")
        if loss is not None:
            self.rows[-1]["loss"] = float(loss)
        if acc is not None:
            self.rows[-1]["acc"] = float(acc)

    def _on_call(self, call: AttentionCall) -> None:
        if call.index < 0:
            key = "(no module)"
        else:
            key = call.name
        if key not in self.layers:
            self.layers.append(key)
        layer = self.layers.index(key)
        s = call.stats
        mx = s.max_logit.detach()  # (B, H, Lq)
        real = torch.isfinite(mx)
        ent = torch.where(real, s.entropy.detach(), torch.zeros_like(s.entropy)).double().sum(dim=(0, 2))  # (H,)
        mxs = torch.where(real, mx, torch.zeros_like(mx)).double().sum(dim=(0, 2))  # (H,)
        top = mx.double().amax(dim=(0, 2)) if mx.numel() else torch.full((mx.shape[1],), -math.inf, dtype=torch.float64)
        n = real.double().sum(dim=(0, 2))  # (H,)
        acc = self._row.sums.get(layer)
        if acc is None or acc[0].shape != ent.shape:
            self._row.sums[layer] = [ent, mxs, top, n]
        else:
            acc[0] = acc[0] + ent
            acc[1] = acc[1] + mxs
            acc[2] = torch.maximum(acc[2], top)
            acc[3] = acc[3] + n

    def _close(self) -> None:
        row, self._row = self._row, None
        heads = []
        for layer in range(len(self.layers)):
            if layer not in row.sums:
                heads.append([])
                continue
            ent, mxs, top, n = (t.cpu() for t in row.sums[layer])
            heads.append([{"entropy": float(ent[h] / n[h]) if n[h] else 0.0,
                           "max_logit": float(mxs[h] / n[h]) if n[h] else -math.inf,
                           "max_logit_max": float(top[h])} for h in range(ent.numel())])
        self.rows.append({"step": row.step, "loss": math.nan, "acc": math.nan, "heads": heads})

    def plot(self, path, *, title: str = "") -> None:
        """Draw loss (if recorded), entropy and max logit per layer and head to ``path`` (PNG), as ``selfattn train`` does."""
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError("Monitor.plot needs matplotlib, part of the [cli] extra: pip install 'selfattn[cli]'",
                                      name=e.name) from e
        from .training.plot import plot_log

        if not self.rows:
            raise ValueError("Monitor.plot: nothing collected yet")
        plot_log(self.rows, path, title=title or f"attention statistics of {len(self.layers)} layers")

"""What a backend receives and what it must provide."""

from __future__ import annotations

import torch

from ..request import Request
from ..stats import AttentionStats
from .capabilities import Capabilities

__all__ = ["Backend", "BackendUnavailable", "Request"]


class BackendUnavailable(RuntimeError):
    """An explicitly chosen backend cannot serve this request."""


class Backend:
    """A way to compute attention. Subclasses fill in the class attributes and two methods.

    Options that only one backend understands reach it as ``req.backend_options`` (a dict,
    ``attention(..., backend_options={...})``); :attr:`options` names the ones it knows, and a
    request carrying any other is refused by name.
    """

    name: str = ""
    summary: str = ""  # one line for the backend table
    features: dict = {}  # feature -> short description of support, for `selfattn backends`
    options: frozenset = frozenset()  # backend_options keys this backend understands
    capabilities: Capabilities = Capabilities()  # what it serves, as data (tests hold unsupported() to it)
    #: unsupported() takes ``data=False`` to leave out the checks that read the tensors' values (a pass over
    #: them); ``auto`` runs those only on the backend it is about to pick
    data_checks: bool = False

    def unsupported(self, q, k, v, req: Request) -> str | None:
        """None if this backend can serve the request, else the name of the missing feature."""
        return None

    def unknown_options(self, req: Request) -> str | None:
        """The backend options of ``req`` this backend does not know, as a message, or None."""
        extra = sorted(set(req.backend_options) - set(self.options))
        if not extra:
            return None
        known = sorted(self.options) or "none"
        return f"backend_options {extra} (backend {self.name!r} knows: {known})"

    def rank(self, req: Request) -> float:
        """Lower is faster; ``auto`` picks the lowest-ranked backend that can serve the request."""
        return 100.0

    def forward(self, q, k, v, req: Request) -> tuple[torch.Tensor, AttentionStats | None]:
        raise NotImplementedError

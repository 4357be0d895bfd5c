"""Adapters that put selfattn inside other libraries' models (nothing below ``functional`` imports them).

* :mod:`selfattn.integrations.transformers`: Hugging Face transformers' attention and mask
  interfaces (``pip install 'selfattn[hf]'``).
"""

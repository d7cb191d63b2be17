"""Callbacks that keep a :class:`polyak.EMA` inside a framework's training loop.

One framework per module, each imported only when asked for (this package imports nothing):

* :mod:`polyak.integrations.lightning` -- ``EMACallback`` for ``lightning`` /
  ``pytorch_lightning`` (``pip install "polyak[lightning]"``).
* :mod:`polyak.integrations.transformers` -- ``EMACallback`` for the Hugging Face ``Trainer``
  (``pip install "polyak[transformers]"``). With Accelerate alone no callback is needed:
  ``accelerator.register_for_checkpointing(ema)`` saves and restores a :class:`polyak.EMA`.
"""

"""Integrations with other training frameworks, one module each (imported on first use).

- :mod:`mend_kernels.integrations.transformers`: :class:`MENDEditCallback`, a transformers
  ``TrainerCallback`` that applies queued edits between optimizer steps of a ``Trainer`` run.
"""

__all__ = ["transformers"]

"""Adapters that put the fused OAPL loss into other people's trainers.

- :mod:`oapl.integrations.trl`: ``OAPLTrainer`` / ``OAPLConfig``, TRL's ``GRPOTrainer`` with
  ``oapl_kernels.oapl_loss`` as its loss (``pip install oapl[trl]``).
- :mod:`oapl.integrations.hidden_head`: the model hook they use, a forward that hands the last
  hidden states and the lm_head to a loss instead of computing logits.
"""

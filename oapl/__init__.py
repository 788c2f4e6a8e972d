"""oapl: off-policy RL post-training of LLMs with OAPL, around a lagged vLLM generator.

Modules: ``config`` (run configs), ``data`` (prompts, toy tasks), ``rewards``, ``generator``
(vLLM), ``policy`` (HF model as hidden states + lm_head), ``trainer`` (one optimizer step via
``oapl_kernels``), ``checkpoint``, ``metrics``, ``plot``, ``loop`` (the lagged loop), ``tiny``
(the built-in tiny model), ``rollout_file`` / ``offline`` (rollout files, offline training and
rounds), ``evaluate`` (pass@k), ``model_dir`` (checkpoints as HF directories) and ``cli`` (the
``oapl`` command). Heavy imports (torch, vLLM) happen in the modules that need them.
"""

"""oapl: off-policy RL post-training of LLMs with OAPL, around a lagged vLLM engine.

Layers, each importing only those below it:

- ``cli`` / ``distributed`` (torchrun entry) / ``offline`` (generate, rounds) / ``evaluate``:
  the commands;
- ``loop``: the one step loop over a batch source; ``run``: run directory, seeds, threads,
  loggers, final export;
- ``sources``: where batches come from (an engine inline or in its worker process, a rollout
  file): scored rollouts out, weights in, no trainer;
- ``engine``: vLLM (the generator, the worker's messages, the weight transports);
  ``training``: policy, trainers, checkpoints;
- ``tasks`` (records and their default reward), ``rewards`` (scorers), ``prompts``,
  ``batch`` (the types that flow: Rollout, ScoredBatch, TrainBatch, collation, scoring);
- ``config``, ``metrics``, ``plot``, ``model_dir`` / ``model_source`` / ``tiny`` (models).

Heavy imports (torch, vLLM) happen in the modules that need them.
"""

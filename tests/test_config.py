"""Config: YAML + dotted overrides, type conversion, errors that list the valid keys."""

import glob
import os

import pytest
import yaml

from oapl.config import Config, config_from_dict, load_config, parse_overrides, save_config


def test_defaults_validate():
    Config().validate()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 1.0e-3\n  steps: 10\nalgorithm:\n  name: grpo\n")
    cfg = load_config(
        str(path),
        ["trainer.lr=3e-4", "output_dir=runs/x", "resume=true", "algorithm.tis_cap=2",
         "trainer.betas=[0.9, 0.95]", "data.limit=null", "generation.engine_kwargs={a: 1}"],
    )
    assert cfg.trainer.lr == 3e-4 and isinstance(cfg.trainer.lr, float)  # "3e-4" is a YAML str
    assert cfg.trainer.steps == 10 and cfg.algorithm.name == "grpo"
    assert cfg.output_dir == "runs/x" and cfg.resume is True
    assert cfg.algorithm.tis_cap == 2.0 and cfg.trainer.betas == [0.9, 0.95]
    assert cfg.data.limit is None and cfg.generation.engine_kwargs == {"a": 1}


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.lrr=1", "valid keys under trainer: steps, minibatches"),
        ("bogus=1", "valid keys under the top level: output_dir, resume, seed, model"),
        ("trainer.lr=fast", "trainer.lr: cannot use 'fast'"),
        ("trainer.steps=1.5", "trainer.steps: cannot use 1.5"),
        ("resume=yes please", "resume: cannot use"),
        ("algorithm.name=ppo", "algorithm.name must be one of ['oapl', 'grpo']"),
        ("algorithm.lag_logprobs=lagged",
         "algorithm.lag_logprobs must be one of ['sampler', 'recompute']"),
        ("generation.logprobs_mode=raw_logits", "generation.logprobs_mode must be one of"),
        ("trainer=3", "trainer must be a mapping"),
        ("trainer.lr", "not of the form key=value"),
        ("generation.n=0", "generation.n must be >= 1"),
        ("data.prompts_per_step=10", "must be divisible by trainer.minibatches"),
        ("trainer.micro_batch_size=12", "must be a multiple of generation.n"),
        ("output.save_every=3", "must be a multiple of lcm(algorithm.sync_every"),
    ],
)
def test_errors(override, message):
    extra = ["trainer.minibatches=4"] if "prompts_per_step" in override else []
    if "save_every" in override:
        extra = ["algorithm.sync_every=2"]
    with pytest.raises(ValueError) as exc:
        load_config(None, [override, *extra])
    assert message in str(exc.value)


def test_raw_logprobs_refused_as_log_pi_lag_away_from_temperature_1():
    """vLLM's raw log-probs are untempered: as log pi_lag they are only right at T = 1."""
    raw = "generation.logprobs_mode=raw_logprobs"
    with pytest.raises(ValueError, match="untempered log-probs"):
        load_config(None, [raw, "generation.temperature=0.7"])
    load_config(None, [raw, "generation.temperature=1.0"])
    load_config(None, [raw, "generation.temperature=0.7", "algorithm.lag_logprobs=recompute"])


NCCL = ["generation.weight_transfer=nccl", "generation.ahead=1", "trainer.device=cuda:0"]


def test_nccl_weight_transfer_needs_ahead_a_cuda_trainer_and_vllm(monkeypatch):
    """Checked in the config, so no GPU is needed to see the errors."""
    load_config(None, NCCL)
    for extra, message in [
        (["generation.weight_transfer=bogus"], "generation.weight_transfer must be one of"),
        (["generation.ahead=0"], "set generation.ahead >= 1"),
        (["trainer.device=cpu"], "set trainer.device to a CUDA device"),
        (["trainer.device=auto"], "set trainer.device to a CUDA device"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(None, [*NCCL, *extra])
    monkeypatch.setattr("oapl.config.has_vllm_nccl_transfer", lambda: False)
    with pytest.raises(ValueError, match="needs vLLM's NCCL weight transfer"):
        load_config(None, NCCL)
    load_config(None, [*NCCL, "generation.weight_transfer=shared_memory"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["algorithm.beta2=0.1", "generation.top_k=5"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e="]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": ""}


EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.yaml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_examples_load(path, monkeypatch):
    # The GPU examples are for machines with vLLM (weight_transfer: nccl checks for it).
    monkeypatch.setattr("oapl.config.has_vllm_nccl_transfer", lambda: True)
    load_config(path)


def test_cli_reports_config_errors(capsys):
    from oapl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", EXAMPLES[0], "trainer.bogus=1"])
    assert exc.value.code == 2
    assert "unknown config key 'trainer.bogus'" in capsys.readouterr().err

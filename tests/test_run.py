"""Run plumbing: the loggers users expect (TensorBoard, W&B offline) and one-line errors for
what a new user mistypes (exit code 2, no traceback)."""

import builtins
import os
import subprocess
import sys

import pytest

from oapl.cli import main
from oapl.config import Config
from oapl.prompts import sampling_seed
from oapl.run import Loggers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-cpu.yaml")
RECORDS = [{"step": s, "reward_mean": 0.1 * s, "loss": 1.0 / s, "lag": s % 2, "time": 5.0,
            "note": "text is jsonl-only"} for s in (1, 2, 3)]


def test_tensorboard_gets_the_jsonl_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = Config(output_dir=str(tmp_path))
    cfg.output.loggers = ["tensorboard"]
    log = Loggers(cfg, step=0)
    for r in RECORDS:
        log.write(r)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"reward_mean", "loss", "lag"}
    for key in ("reward_mean", "loss", "lag"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([r[key] for r in RECORDS])
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3


def test_wandb_offline_or_a_clear_error(tmp_path, monkeypatch):
    """W&B logs offline under the run directory when installed; without the package, asking
    for it is a clear error (never a network call either way)."""
    cfg = Config(output_dir=str(tmp_path))
    cfg.output.loggers = ["wandb"]
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match="wandb package is not installed"):
        Loggers(cfg, step=0)
    monkeypatch.undo()
    try:
        import wandb  # noqa: F401
    except ImportError:
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = Loggers(cfg, step=0)
    for r in RECORDS:
        log.write(r)
    log.close()
    assert any(name.startswith("offline-run") for name in os.listdir(tmp_path / "wandb"))


def test_sampling_seeds_do_not_collide():
    assert sampling_seed(0, 5) == 5 and sampling_seed(1, 0) != sampling_seed(0, 2**30)


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_one_line_errors(tmp_path, capsys):
    assert "config file 'nope.yaml' does not exist" in _error(capsys, ["train", "nope.yaml"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("seed: 0\ntrainer: [unclosed\n")
    assert f"{bad_yaml}:" in _error(capsys, ["train", str(bad_yaml)])
    no_warmup = "model.tiny_format_warmup_steps=0"
    missing = tmp_path / "missing.jsonl"
    err = _error(capsys, ["train", TINY, f"output_dir={tmp_path / 'a'}", no_warmup,
                          f"data.source={missing}"])
    assert f"data.source '{missing}': no such file" in err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "max 1 2 =", "answer": "2"}\n{"prompt": "max 3\n')
    err = _error(capsys, ["train", TINY, f"output_dir={tmp_path / 'b'}", no_warmup,
                          f"data.source={prompts}"])
    assert f"{prompts}:2: not JSON" in err
    assert "unknown config key 'trainer.lr_max'" in _error(capsys, ["train", TINY,
                                                                     "trainer.lr_max=1"])


def test_missing_config_from_the_shell():
    proc = subprocess.run([sys.executable, "-m", "oapl.cli", "train", "missing.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "oapl train: error: config file 'missing.yaml' does not exist"

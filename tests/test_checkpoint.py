"""Atomic checkpoints (a crash mid-write leaves the last good one), restore, metrics log."""

import copy
import json
import os
import random

import pytest
import torch

from oapl.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from oapl.config import Config
from oapl.batch import Rollout
from oapl.metrics import MetricsLog, read_metrics
from oapl.training.policy import Policy
from oapl.batch import collate
from oapl.training.trainer import LocalTrainer


def _trainer(model_dir):
    cfg = Config()
    cfg.generation.n = 2
    policy = Policy.from_pretrained(model_dir, torch.float32, torch.device("cpu"))
    return LocalTrainer(policy, cfg)


def _step(trainer):
    r = [Rollout(0, [1, 14, 3, 4, 15], [4 + i, 2], [-2.0, -0.1], "stop", 0) for i in range(2)]
    trainer.train_step(collate(r, [1.0, 0.0], pad_id=0))


def _params(trainer):
    return [p.detach().clone() for p in trainer.policy.parameters()]


def test_save_load_round_trip(tmp_path, tiny_model_dir):
    trainer = _trainer(tiny_model_dir)
    _step(trainer)
    root = str(tmp_path / "ckpt")
    random.seed(7)
    torch.manual_seed(7)
    path = save_checkpoint(root, trainer, {"step": 1, "sampler": {"epoch": 0, "cursor": 3}}, keep=2)
    assert os.path.basename(path) == "step_00000001"
    saved, opt_state = _params(trainer), copy.deepcopy(trainer.optimizer.state_dict())
    expect = (random.random(), torch.rand(3))
    _step(trainer)  # move weights, optimizer state and RNGs on
    random.random(), torch.rand(3)

    fresh = _trainer(tiny_model_dir)
    state = load_checkpoint(path, fresh)
    assert state == {"step": 1, "sampler": {"epoch": 0, "cursor": 3}}
    for a, b in zip(saved, _params(fresh)):
        assert torch.equal(a, b)
    got = fresh.optimizer.state_dict()
    assert got["state"][0]["step"] == opt_state["state"][0]["step"]
    assert torch.equal(got["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])
    assert random.random() == expect[0] and torch.equal(torch.rand(3), expect[1])  # RNGs restored


def test_crash_mid_write_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    trainer = _trainer(tiny_model_dir)
    root = str(tmp_path / "ckpt")
    good = save_checkpoint(root, trainer, {"step": 2}, keep=2)
    _step(trainer)

    real_save = trainer.save

    def crash(directory):
        real_save(directory)
        with open(os.path.join(directory, "optimizer.pt"), "r+b") as f:
            f.truncate(10)  # a torn file, then the process dies
        raise KeyboardInterrupt("killed mid-checkpoint")

    monkeypatch.setattr(trainer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, trainer, {"step": 4}, keep=2)
    assert os.path.isdir(os.path.join(root, "step_00000004.tmp"))
    assert list_checkpoints(root) == [good]
    assert load_checkpoint(good, _trainer(tiny_model_dir)) == {"step": 2}

    monkeypatch.setattr(trainer, "save", real_save)
    for step in (4, 6):
        save_checkpoint(root, trainer, {"step": step}, keep=2)
    names = [os.path.basename(p) for p in list_checkpoints(root)]
    assert names == ["step_00000004", "step_00000006"]
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000006"]


def test_metrics_log_truncates_and_skips_a_torn_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    log.truncate_after(0)  # a fresh run: creates an empty file
    for step in range(1, 6):
        log.write({"step": step, "reward_mean": step / 10})
    with open(path, "a") as f:
        f.write('{"step": 6, "rew')  # killed mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    log.truncate_after(3)
    log.write({"step": 4, "reward_mean": 0.0})
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3, 4]

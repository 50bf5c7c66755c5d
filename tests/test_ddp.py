"""Distributed recovery training on 2 CPU processes (gloo): the ranks end with identical weights.

Each rank starts from differently seeded weights and draws different data; DistributedDataParallel
broadcasts rank 0's weights and averages gradients, so after a few optimizer steps (with gradient
accumulation) both ranks must hold bit-identical tensors — and FSDP (fully_shard) must train to the
same weights up to float rounding, and resume after a kill to the same loss curve.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import kronfact  # noqa: E402
from kronfact.kron import decompose  # noqa: E402
from kronfact.layer import KronLinear  # noqa: E402
from kronfact.modules import linear_weight  # noqa: E402
from kronfact.train import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.slow  # torchrun subprocesses: in CI, not in the fast lane

VOCAB = 64


def tiny_compressed_gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    for name, module in list(model.named_modules()):
        if name.endswith(("mlp.c_fc", "mlp.c_proj")):
            factors = decompose(linear_weight(module), (8, 4) if name.endswith("c_fc") else (4, 8), rank=2)
            model.set_submodule(name, KronLinear.from_factors(factors, module.bias.detach(), orientation="conv1d"))
    return model


class _Killed(Exception):
    pass


def _kill_at_2(entry):
    if entry["step"] == 2:
        raise _Killed


def _worker(rank: int, port: int, folder: str, fsdp: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    data = (torch.arange(4000) * 7) % VOCAB
    config = dict(tokens=2 * 2 * 2 * 16 * 3, batch_size=2, grad_accum=2, seq_len=16, lr=1e-2, warmup=0,
                  progress=False, fsdp=fsdp, keep_best=False, save_every=1)
    if not fsdp:  # train() opens the process group from the environment, and closes it
        model = tiny_compressed_gpt2(seed=rank)  # different on each rank: DDP must broadcast rank 0's
        assert train(model, data, TrainConfig(out_dir=os.path.join(folder, "run"), **config)).steps == 3
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                  os.path.join(folder, f"rank{rank}.safetensors"))
        return
    torch.distributed.init_process_group("gloo")  # the caller's group: train() uses it and leaves it open
    try:
        full = train(tiny_compressed_gpt2(seed=rank), data, TrainConfig(out_dir=os.path.join(folder, "run"), **config))
        with pytest.raises(_Killed):
            train(tiny_compressed_gpt2(seed=rank), data, TrainConfig(out_dir=os.path.join(folder, "killed"), **config),
                  callback=_kill_at_2)
        resumed = train(tiny_compressed_gpt2(seed=rank), data,
                        TrainConfig(out_dir=os.path.join(folder, "killed"), **config))
        assert resumed.resumed_from == 2 and resumed.curve() == full.curve()
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(folder, fsdp: bool) -> None:
    mp.spawn(_worker, args=(_free_port(), str(folder), fsdp), nprocs=2, join=True)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    _spawn(folder, fsdp=False)
    return folder


def test_ddp_ranks_hold_identical_weights_after_training(ddp_run):
    r0, r1 = load_file(ddp_run / "rank0.safetensors"), load_file(ddp_run / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    start = tiny_compressed_gpt2(seed=0).state_dict()
    changed = [n for n in r0 if not torch.equal(r0[n], start[n])]
    assert any(".mlp.c_fc.a" in n for n in changed)  # training moved the factors


def test_ddp_rank0_writes_one_checkpoint_that_matches(ddp_run):
    weights = load_file(ddp_run / "run" / "last" / "model.safetensors")
    r0 = load_file(ddp_run / "rank0.safetensors")
    assert all(torch.equal(weights[n], r0[n]) for n in r0)
    lines = (ddp_run / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3  # one writer: rank 0 only


def test_fsdp_trains_to_the_ddp_weights_and_resumes(ddp_run, tmp_path):
    _spawn(tmp_path, fsdp=True)  # the workers also check kill + resume themselves
    fsdp = load_file(tmp_path / "run" / "last" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "last" / "model.safetensors")
    assert all(torch.equal(fsdp[n], t) for n, t in resumed.items())
    ddp = load_file(ddp_run / "run" / "last" / "model.safetensors")
    assert fsdp.keys() >= ddp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=name)
    # the file an FSDP run writes is a kronfact file: it reopens into an uncompressed skeleton
    skeleton = kronfact.load(tmp_path / "run" / "last" / "model.safetensors",
                             transformers.GPT2LMHeadModel(tiny_compressed_gpt2(seed=0).config))
    assert sum(isinstance(m, KronLinear) for m in skeleton.modules()) == 4
    assert all(torch.equal(skeleton.state_dict()[n], t) for n, t in fsdp.items())


def test_recipe_entry_point_runs_under_torchrun(tiny_gpt2_dir, shakespeare_dir, tmp_path):
    """The user's command, `torchrun --nproc_per_node 2 -m kronfact.cli recipe run …`, as real processes:
    both ranks compress and train, rank 0 alone evaluates and writes a loadable folder."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           env["MASTER_PORT"], "-m", "kronfact.cli", "recipe", "run", "recipes/shakespeare-tiny.toml",
           "--set", "train.tokens=2048", "--set", "train.batch_size=2", "--set", "train.seq_len=64",
           "--set", "eval.max_tokens=1000", "--set", f"output.dir={out}", "--set", "train.progress=false"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["train"]["tokens"] == 2048 and result["train"]["steps"] == 2048 // (2 * 2 * 64)
    from kronfact import from_pretrained
    from kronfact.layer import KronLinear as _KL

    model = from_pretrained(out / "model")
    assert any(isinstance(m, _KL) for m in model.modules())

"""kronfact.io: bit-exact save/load round trips, tied tensors, merge, and bad input (nothing changed or
half-written)."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import kronfact  # noqa: E402
from kronfact import io  # noqa: E402
from kronfact.layer import KronLinear  # noqa: E402
from kronfact.modules import is_conv1d, linear_weight  # noqa: E402

VOCAB, D, HIDDEN = 24, 12, 18


class TiedNet(nn.Module):
    """ids (b, t) → logits (b, t, VOCAB): embedding, Linear up, Conv1D down, norm, a buffer, a tied head."""

    def __init__(self, vocab: int = VOCAB, d: int = D, hidden: int = HIDDEN, up_bias: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, hidden, bias=up_bias)
        self.down = Conv1D(d, hidden)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("scale", torch.rand(d) + 0.5)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        nn.init.normal_(self.down.bias)
        self.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(self.norm(h) * self.scale)


def kron(model: nn.Module, name: str, shape_a: tuple[int, int], rank: int) -> None:
    """Replace ``model.<name>`` by its rank-``rank`` Kronecker approximation (a stand-in for compress)."""
    module = model.get_submodule(name)
    factors = kronfact.decompose(linear_weight(module).detach(), shape_a, rank)
    bias = None if module.bias is None else module.bias.detach()
    model.set_submodule(name, KronLinear.from_factors(factors, bias, orientation="conv1d" if is_conv1d(module)
                                                      else "linear"))


def compressed_net(seed: int = 0, **kw) -> TiedNet:
    torch.manual_seed(seed)
    net = TiedNet(**kw)
    kron(net, "up", (3, 4), 2)
    kron(net, "down", (4, 3), 1)
    return net


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Module types by name and a copy of every tensor: to check that a failed load changed nothing."""
    return ({n: type(m).__name__ for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    assert all(torch.equal(a[1][k], b[1][k]) and a[1][k].dtype == b[1][k].dtype for k in a[1])


def rewrite(src: Path, dst: Path, metadata=None, drop=(), add=None) -> None:
    """Copy a safetensors file with changed metadata / tensors (to forge bad input)."""
    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(metadata or {})
    tensors = {k: v for k, v in load_file(src).items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, dst, {k: v for k, v in meta.items() if v is not None})


# ------------------------------------------------------------------------------------------ round trips


@st.composite
def compression_case(draw):
    up_shape = draw(st.sampled_from(kronfact.factor_shapes(HIDDEN, D)))
    down_shape = draw(st.sampled_from(kronfact.factor_shapes(D, HIDDEN)))
    ranks = [draw(st.integers(1, min(3, kronfact.kron.max_rank(s.shape_a, s.shape_b))))
             for s in (up_shape, down_shape)]
    return (up_shape.shape_a, ranks[0], down_shape.shape_a, ranks[1], draw(st.booleans()),
            draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])))


@given(case=compression_case())
@settings(max_examples=20, deadline=None)
def test_save_load_round_trip_is_bit_exact(case, tmp_path_factory):
    up_a, up_r, down_a, down_r, up_bias, dtype = case
    torch.manual_seed(0)
    net = TiedNet(up_bias=up_bias, dtype=dtype)
    kron(net, "up", up_a, up_r)
    kron(net, "down", down_a, down_r)
    path = tmp_path_factory.mktemp("rt") / "net.safetensors"
    kronfact.io.save(net, path)

    torch.manual_seed(1)  # a skeleton with different values
    skeleton = TiedNet(up_bias=up_bias, dtype=dtype)
    assert kronfact.io.load(path, skeleton) is skeleton
    assert io.compressed_modules(skeleton) == io.compressed_modules(net)
    assert skeleton.down.orientation == "conv1d" and skeleton.up.orientation == "linear"
    want, got = net.state_dict(), skeleton.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert skeleton.head.weight is skeleton.emb.weight  # still tied
    assert torch.equal(skeleton(ids()), net(ids()))


def test_tied_tensor_is_stored_once_and_metadata_describes_modules(tmp_path):
    net = compressed_net()
    kronfact.io.save(net, tmp_path / "net.safetensors")
    with safe_open(tmp_path / "net.safetensors", framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "emb.weight" in keys and "head.weight" not in keys
    assert keys == set(net.state_dict()) - {"head.weight"}
    assert {"up.a", "up.b", "up.bias", "down.a", "down.b", "down.bias", "scale"} <= keys
    assert meta["kronfact_format"] == io.FORMAT_VERSION
    assert json.loads(meta["kronfact_modules"]) == [
        {"name": "up", "in_features": D, "out_features": HIDDEN, "shape_a": [3, 4], "rank": 2,
         "orientation": "linear", "bias": True},
        {"name": "down", "in_features": HIDDEN, "out_features": D, "shape_a": [4, 3], "rank": 1,
         "orientation": "conv1d", "bias": True},
    ]


def test_load_into_an_already_compressed_model(tmp_path):
    net = compressed_net(seed=0)
    kronfact.io.save(net, tmp_path / "net.safetensors")
    other = compressed_net(seed=5)
    up = other.up
    kronfact.io.load(tmp_path / "net.safetensors", other)
    assert other.up is up  # same structure: modules kept, tensors loaded
    assert torch.equal(other(ids()), net(ids()))


def test_load_follows_the_skeleton_dtype(tmp_path):
    net = compressed_net()
    kronfact.io.save(net, tmp_path / "net.safetensors")
    torch.manual_seed(3)
    skeleton = TiedNet(dtype=torch.float64)
    kronfact.io.load(tmp_path / "net.safetensors", skeleton)
    assert skeleton.up.a.dtype == torch.float64
    assert torch.equal(skeleton.up.a, net.up.a.double())


# ------------------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_restores_layer_types_with_the_dense_product(dtype):
    net = compressed_net()
    net.to(dtype)
    net.down.requires_grad_(False)
    compressed = net(ids())
    dense_up, dense_down = net.up.to_dense().detach(), net.down.to_dense().detach()
    assert kronfact.io.merge(net) is net
    assert type(net.up) is nn.Linear and type(net.down) is Conv1D
    assert not any(isinstance(m, KronLinear) for m in net.modules())
    assert torch.equal(net.up.weight, dense_up) and torch.equal(net.down.weight, dense_down.T)
    assert net.up.weight.dtype == dtype and net.down.weight.dtype == dtype
    assert net.up.weight.requires_grad and not net.down.weight.requires_grad
    torch.testing.assert_close(net(ids()), compressed)


def test_merge_of_a_conv1d_kronlinear_without_bias_has_a_zero_bias():
    layer = KronLinear(6, 4, (2, 3), 1, bias=False, orientation="conv1d")
    merged = kronfact.io.merge(layer)
    assert type(merged) is Conv1D and torch.equal(merged.bias, torch.zeros(4))
    x = torch.randn(3, 6)
    torch.testing.assert_close(merged(x), layer(x))


# -------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "net.safetensors"
    kronfact.io.save(compressed_net(), path)
    return path


def expect_load_error(path: Path, skeleton: nn.Module, match: str) -> None:
    before = snapshot(skeleton)
    with pytest.raises(ValueError, match=match):
        kronfact.io.load(path, skeleton)
    assert_same(snapshot(skeleton), before)


@pytest.mark.parametrize("metadata, match", [
    ({"kronfact_format": "2"}, "format '2'.*upgrade kronfact"),
    ({"kronfact_format": None}, "not written by kronfact.save"),
    ({"kronfact_modules": "[{"}, "not valid JSON"),
    ({"kronfact_modules": '[{"name": "up"}]'}, "malformed compressed-module entry"),
])
def test_bad_metadata(saved, tmp_path, metadata, match):
    rewrite(saved, tmp_path / "bad.safetensors", metadata)
    expect_load_error(tmp_path / "bad.safetensors", TiedNet(), match)


def test_module_name_not_in_skeleton_names_it_and_the_closest(saved, tmp_path):
    entries = json.loads(safe_open(saved, framework="pt").metadata()["kronfact_modules"])
    entries[0]["name"] = "upp"
    rewrite(saved, tmp_path / "bad.safetensors", {"kronfact_modules": json.dumps(entries)})
    expect_load_error(tmp_path / "bad.safetensors", TiedNet(), r"'upp' does not exist.*closest: up")


def test_shape_mismatch_of_a_compressed_module_names_it(saved):
    expect_load_error(saved, TiedNet(hidden=24), r"shape mismatch at 'up': \(out, in\) = \(24, 12\)")


def test_shape_mismatch_of_another_tensor_names_it(saved):
    expect_load_error(saved, TiedNet(vocab=30), r"shape mismatch at emb.weight: \(24, 12\) in the file")


def test_wrong_layer_type_or_bias(saved, tmp_path):
    entries = json.loads(safe_open(saved, framework="pt").metadata()["kronfact_modules"])
    entries[1]["name"] = "norm"
    rewrite(saved, tmp_path / "norm.safetensors", {"kronfact_modules": json.dumps(entries)})
    expect_load_error(tmp_path / "norm.safetensors", TiedNet(), "'norm' is a LayerNorm")
    entries[1]["name"], entries[1]["orientation"] = "up", "conv1d"
    rewrite(saved, tmp_path / "conv.safetensors", {"kronfact_modules": json.dumps(entries[1:])})
    expect_load_error(tmp_path / "conv.safetensors", TiedNet(), "'up' is a Linear.*replaced a Conv1D")
    expect_load_error(saved, TiedNet(up_bias=False), "'up' has no bias in this model, but a bias in the file")


def test_missing_and_unexpected_tensors_are_named(saved, tmp_path):
    rewrite(saved, tmp_path / "missing.safetensors", drop=("norm.bias", "up.b"))
    expect_load_error(tmp_path / "missing.safetensors", TiedNet(), "missing from the file: norm.bias, up.b")
    rewrite(saved, tmp_path / "extra.safetensors", add={"extra.weight": torch.zeros(2)})
    expect_load_error(tmp_path / "extra.safetensors", TiedNet(), "in the file but not in the model: extra.weight")


def test_corrupt_truncated_or_missing_file(saved, tmp_path):
    data = saved.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 20)
    for name in ("truncated", "garbage"):
        expect_load_error(tmp_path / f"{name}.safetensors", TiedNet(), "truncated")
    expect_load_error(tmp_path / "absent.safetensors", TiedNet(), "does not exist")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_meta_skeleton_takes_the_files_tensors_in_its_dtype_and_is_re_tied(saved, dtype):
    with torch.device("meta"):
        skeleton = TiedNet(dtype=dtype)
    assert kronfact.io.load(saved, skeleton) is skeleton
    real = kronfact.io.load(saved, TiedNet(dtype=dtype))
    assert not any(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    assert skeleton.head.weight is skeleton.emb.weight
    assert_same(snapshot(skeleton), snapshot(real))
    assert torch.equal(skeleton(ids()), real(ids()))


@pytest.mark.parametrize("meta", [False, True])
def test_an_eval_skeleton_loads_laid_out_for_inference(tmp_path, meta):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024))
    kron(model, "0", (256, 256), 1)  # Krony-PT's 81M c_fc, scaled: a decoded token takes A-first
    model.eval()
    source = model[0]
    assert source.choose_path(1, cached=True) == "a_first" and not source.a.is_contiguous()  # eval() laid it out
    io.save(model, tmp_path / "m.safetensors")
    with torch.device("meta" if meta else "cpu"):
        skeleton = nn.Sequential(nn.Linear(256, 1024)).eval()
    loaded = io.load(tmp_path / "m.safetensors", skeleton)[0]
    assert not loaded.training and loaded.a.stride() == source.a.stride() and loaded.b.stride() == source.b.stride()
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_failed_save_leaves_the_previous_file_and_no_temp(saved, monkeypatch):
    before = saved.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        kronfact.io.save(compressed_net(seed=9), saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_save_to_a_missing_directory_or_a_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        kronfact.io.save(compressed_net(), tmp_path / "nope" / "net.safetensors")
    with pytest.raises(ValueError, match="is a directory"):
        kronfact.io.save(compressed_net(), tmp_path)


# ------------------------------------------------------------------------------ transformers folders


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    kron(model, "transformer.h.0.mlp.c_fc", (4, 4), 2)
    return model


def test_save_pretrained_refuses_to_overwrite_then_overwrites_atomically(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="overwrite=True"):
        kronfact.pretrained.save_pretrained(model, out)
    assert os.listdir(out) == ["keep.txt"]
    kronfact.pretrained.save_pretrained(model, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "kronfact.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp folder left
    loaded = kronfact.pretrained.from_pretrained(out)
    x = torch.randint(0, 40, (1, 6))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_failed_save_pretrained_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        kronfact.pretrained.save_pretrained(tiny_gpt2(), tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        kronfact.pretrained.save_pretrained(tiny_gpt2(), tmp_path / "old", overwrite=True)
    assert os.listdir(tmp_path) == ["old"] and os.listdir(tmp_path / "old") == ["keep.txt"]


def test_save_pretrained_needs_a_transformers_model(tmp_path):
    with pytest.raises(ValueError, match="use kronfact.save"):
        kronfact.pretrained.save_pretrained(compressed_net(), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_from_pretrained_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        kronfact.pretrained.from_pretrained(tmp_path)
    out = tmp_path / "ckpt"
    kronfact.pretrained.save_pretrained(tiny_gpt2(), out)
    info = json.loads((out / "kronfact.json").read_text())
    (out / "kronfact.json").write_text(json.dumps({**info, "kronfact_format": "7"}))
    with pytest.raises(ValueError, match="format '7'"):
        kronfact.pretrained.from_pretrained(out)
    info["modules"][0]["rank"] = 1
    (out / "kronfact.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="disagree"):
        kronfact.pretrained.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModel"]}))
    with pytest.raises(ValueError, match="NoSuchModel"):
        kronfact.pretrained.from_pretrained(out)


def test_permuted_layers_round_trip_and_merge(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
    g = torch.Generator().manual_seed(1)
    layer = KronLinear.from_linear(net[0], (8, 4), 2).set_permutations(torch.randperm(16, generator=g),
                                                                       torch.randperm(64, generator=g))
    net[0] = layer
    path = tmp_path / "perm.safetensors"
    kronfact.io.save(net, path)
    skeleton = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
    kronfact.io.load(path, skeleton)
    assert io.compressed_modules(skeleton) == io.compressed_modules(net)
    assert torch.equal(skeleton[0].in_perm, layer.in_perm) and torch.equal(skeleton[0].out_perm, layer.out_perm)
    x = torch.randn(5, 16)
    assert torch.equal(skeleton(x), net(x))
    merged = kronfact.io.merge(skeleton)
    assert type(merged[0]) is nn.Linear
    torch.testing.assert_close(merged(x), net(x))


def test_a_module_shared_under_two_names_round_trips_and_merges_as_one(tmp_path):
    def shared_net():
        torch.manual_seed(0)
        net = nn.Module()
        net.a = nn.Linear(16, 64)
        net.b = net.a
        return net

    net = shared_net()
    kronfact.compress(net, "a", shape_a=(8, 4), rank=2, progress=False)
    assert net.a is net.b and isinstance(net.b, KronLinear)
    kronfact.io.save(net, tmp_path / "shared.safetensors")
    skeleton = kronfact.io.load(tmp_path / "shared.safetensors", shared_net())
    assert skeleton.a is skeleton.b and isinstance(skeleton.b, KronLinear)
    assert torch.equal(skeleton.a.to_dense(), net.a.to_dense())
    x = torch.randn(3, 16)
    want = net.a(x)
    kronfact.io.merge(skeleton)
    assert skeleton.a is skeleton.b and type(skeleton.b) is nn.Linear
    torch.testing.assert_close(skeleton.b(x), want)


def test_a_file_whose_gather_orders_are_not_permutations_is_refused(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64))
    net[0] = KronLinear.from_linear(net[0], (8, 4), 1).set_permutations(torch.randperm(16), None)
    path = tmp_path / "perm.safetensors"
    kronfact.io.save(net, path)
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.in_perm"] = torch.zeros(16, dtype=torch.long)  # repeated index: silently wrong outputs if loaded
    save_file(tensors, path, meta)
    skeleton = nn.Sequential(nn.Linear(16, 64))
    with pytest.raises(ValueError, match="bad permutation.*not a permutation"):
        kronfact.io.load(path, skeleton)
    assert type(skeleton[0]) is nn.Linear  # unchanged

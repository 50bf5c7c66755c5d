"""The kronfact command line: every command, every bad input, and one real subprocess of the script."""

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from kronfact import cli
from kronfact.analyze import analyze_shapes
from kronfact.budget import candidate_shapes
from kronfact.cli import app, rule_list
from kronfact.kron import decompose, factor_shapes

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables as wide as they need: names are not folded across lines."""
    monkeypatch.setattr(cli.console, "width", 240)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_bad_input(result, *fragments):
    """Exit code 2, one line on stderr naming the problem (after any one-line warnings), no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("kronfact: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("kronfact: error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def matrices(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed_tokens.weight": torch.randn(50, 8, generator=g),
        "layers.0.attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "layers.0.mlp.up_proj.weight": torch.randn(24, 8, generator=g),
        "layers.0.mlp.down_proj.weight": torch.randn(8, 24, generator=g),
        "layers.0.mlp.down_proj.bias": torch.randn(8, generator=g),
        "layers.1.mlp.up_proj.weight": torch.randn(24, 8, generator=g).half(),
        "step": torch.tensor([3, 4]),
    }


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(matrices(), path)
    return path


def analyze_rows(path, *extra, tmp=None):
    out = Path(tmp or path.parent) / "rows.json"
    result = invoke("analyze", path, "--json", out, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result


# -------------------------------------------------------------------------------------------- analyze


def test_analyze_rows_match_decompose_and_the_best_shape_is_the_least_error_that_fits(ckpt):
    rows, result = analyze_rows(ckpt, "--ranks", "1,2", "--fractions", "0.25,0.5")
    weights = matrices()
    names = {r["name"] for r in rows}
    assert names == {"layers.0.attn.q_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj",
                     "layers.1.mlp.up_proj"}  # default: 2-D floating, no embedding, no bias, no int tensor
    for row in rows:
        w = weights[row["name"] + ".weight"].float()
        assert row["shape"] == list(w.shape)
        assert row["params"] == row["rank"] * (math.prod(row["shape_a"]) + math.prod(row["shape_b"]))
        ref = decompose(w, row["shape_a"], rank=row["rank"], svd="exact").rel_error
        assert row["rel_error"] == pytest.approx(ref, abs=1e-5)
    for name in names:
        for f in (0.25, 0.5):
            group = [r for r in rows if r["name"] == name and r.get("fraction") == f]
            n = math.prod(group[0]["shape"])
            assert all(r["params"] <= f * n for r in group)
            best = [r for r in group if r["best"]]
            solver = [r for r in group if r["solver"]]  # compress's own candidates: the recommendation is one
            assert solver and len(best) == 1 and best[0]["solver"]
            assert best[0]["rel_error"] == min(r["rel_error"] for r in solver)
            assert {tuple(r["shape_a"]) for r in solver} == set(candidate_shapes(*group[0]["shape"])) & {
                tuple(r["shape_a"]) for r in group}
    ranked = [r for r in rows if "fraction" not in r]
    assert {r["rank"] for r in ranked} == {1, 2}
    assert "layers.0.mlp.down_proj" in result.stdout and "keep" in result.stdout


def test_analyze_reads_gpt2_conv1d_orientation_from_config(tmp_path):
    w = torch.randn(8, 24)  # Conv1D c_fc stores (in, out) = (8, 24)
    save_file({"h.0.mlp.c_fc.weight": w, "h.0.mlp.c_fc.bias": torch.zeros(24)}, tmp_path / "model.safetensors")
    rows, result = analyze_rows(tmp_path / "model.safetensors", "--fractions", "0.5")
    assert {tuple(r["shape"]) for r in rows} == {(8, 24)}  # no config.json: read as stored
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    rows, result = analyze_rows(tmp_path, "--fractions", "0.5")
    assert {tuple(r["shape"]) for r in rows} == {(24, 8)}
    row = rows[0]
    assert row["rel_error"] == pytest.approx(decompose(w.T, row["shape_a"], row["rank"], svd="exact").rel_error,
                                             abs=1e-5)
    assert "Conv1D" in result.stdout


def test_analyze_sharded_index_gives_the_same_rows_as_one_file(tmp_path, ckpt):
    tensors = matrices()
    names = sorted(tensors)
    shards = {"a.safetensors": names[:3], "b.safetensors": names[3:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    single, _ = analyze_rows(ckpt, tmp=tmp_path)
    for target in (folder, folder / "model.safetensors.index.json"):
        sharded, _ = analyze_rows(target, tmp=tmp_path)
        assert sharded == single


def test_analyze_rules_select_modules(ckpt):
    rows, _ = analyze_rows(ckpt, "--rules", "mlp.*")
    assert {r["name"] for r in rows} == {"layers.0.mlp.up_proj", "layers.0.mlp.down_proj", "layers.1.mlp.up_proj"}
    rows, _ = analyze_rows(ckpt, "--rules", "embed_tokens")
    assert {r["name"] for r in rows} == {"embed_tokens"}  # asked for explicitly
    rows, _ = analyze_rows(ckpt, "--rules", "mlp.*,!layers.1.*")  # kronfact.rules semantics: exclusions
    assert {r["name"] for r in rows} == {"layers.0.mlp.up_proj", "layers.0.mlp.down_proj"}
    rows, _ = analyze_rows(ckpt, "--rules", r"re:^layers\.\d{1,2}\.mlp\.up_proj$")  # a regex keeps its commas
    assert {r["name"] for r in rows} == {"layers.0.mlp.up_proj", "layers.1.mlp.up_proj"}


def test_analyze_plot_writes_a_png(ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    result = invoke("analyze", ckpt, "--plot", tmp_path / "err.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "err.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_plot_without_matplotlib(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert_bad_input(invoke("analyze", ckpt, "--plot", tmp_path / "err.png"), "needs matplotlib", "kronfact[plot]")


def test_analyze_shapes_grid_keeps_corners_and_respects_max_side():
    a_shapes = {s.shape_a for s in analyze_shapes(3072, 768, grid=4, max_side=1024)}
    assert (3072, 1) in a_shapes  # plain low rank: R(W) is W, short side 768
    assert (1, 768) not in a_shapes and (1, 1) not in a_shapes and (3072, 768) not in a_shapes
    assert 4 <= len(a_shapes) <= 24 and set(candidate_shapes(3072, 768)) <= a_shapes  # the solver's always
    big = analyze_shapes(4096, 4096, grid=4, max_side=1024)
    extra = [s for s in big if s.shape_a not in candidate_shapes(4096, 4096)]  # the grid's own shapes
    assert extra and all(min(s.shape_a[0] * s.shape_a[1], s.shape_b[0] * s.shape_b[1]) <= 1024 for s in extra)
    every = analyze_shapes(24, 8, grid=0, max_side=10**6)
    assert len(every) == len(factor_shapes(24, 8)) - 3


# ----------------------------------------------------------------------------------- bad checkpoint input


def test_missing_path(tmp_path):
    assert_bad_input(invoke("analyze", tmp_path / "nope.safetensors"), "does not exist")


class Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickles_are_refused_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(pickle.dumps(Boom(marker)))
    assert_bad_input(invoke("analyze", path), "pickle", "safetensors")
    assert_bad_input(invoke("analyze", tmp_path), "pickle")  # a folder holding only the pickle
    assert_bad_input(invoke("eval", tmp_path, "--text", path), "config.json")
    (tmp_path / "config.json").write_text("{}")
    assert_bad_input(invoke("compress", tmp_path, "-o", tmp_path / "out", "--ratio", "0.5"), "pickle")
    assert not marker.exists()


def test_truncated_safetensors(ckpt):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-100])
    assert_bad_input(invoke("analyze", ckpt), "truncated")
    ckpt.write_bytes(data[:4])
    assert_bad_input(invoke("analyze", ckpt), "too short")


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + bytes(64))
    assert_bad_input(invoke("analyze", path), "corrupt", "not valid JSON")
    path.write_bytes(os.urandom(4096))
    assert_bad_input(invoke("analyze", path), "truncated or not a safetensors file")
    path.write_bytes((2).to_bytes(8, "little") + b"[]")
    assert_bad_input(invoke("analyze", path), "not a JSON object")


def write_raw(path, header, data_len):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data_len))


@pytest.mark.parametrize("header, data_len, message", [
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, 64, "header lies: w is F32 (4, 4) (64 bytes)"),
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, 32, "past the end of the file"),
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
      "v": {"dtype": "F32", "shape": [2, 4], "data_offsets": [32, 64]}}, 64, "overlap"),
    ({"w": {"dtype": "F32", "shape": [4, -4], "data_offsets": [0, 64]}}, 64, "malformed header entry"),
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [64, 0]}}, 64, "malformed header entry"),
    ({"w": {"dtype": "F32", "shape": [4, 4]}}, 64, "malformed header entry"),
])
def test_headers_whose_offsets_lie(tmp_path, header, data_len, message):
    path = tmp_path / "lie.safetensors"
    write_raw(path, header, data_len)
    assert_bad_input(invoke("analyze", path), message)


def test_sharded_index_problems(tmp_path):
    save_file({"a.weight": torch.randn(4, 4)}, tmp_path / "s1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"}}))
    assert_bad_input(invoke("analyze", index), "s2.safetensors", "does not exist")
    index.write_text(json.dumps({"weight_map": {"b.weight": "s1.safetensors"}}))
    assert_bad_input(invoke("analyze", index), "b.weight", "no such tensor")
    index.write_text("[1, 2]")
    assert_bad_input(invoke("analyze", index), "not a valid safetensors index")


def test_rules_matching_nothing(ckpt):
    assert_bad_input(invoke("analyze", ckpt, "--rules", "decoder.*"), "match no 2-D weight", "layers.0")


@pytest.mark.parametrize("args, message", [
    (["--ranks", "one"], "--ranks must be a comma-separated list of ints"),
    (["--ranks", "0"], "--ranks must be positive"),
    (["--fractions", "1.5"], "--fractions must lie in (0, 1]"),
    (["--grid", "1"], "--grid"),
])
def test_analyze_bad_options(ckpt, args, message):
    assert_bad_input(invoke("analyze", ckpt, *args), message)


def test_analyze_unwritable_outputs(ckpt, tmp_path):
    assert_bad_input(invoke("analyze", ckpt, "--json", tmp_path / "no" / "dir.json"), "does not exist")
    assert_bad_input(invoke("analyze", ckpt, "--json", tmp_path), "is a directory")


def test_failed_json_write_leaves_nothing(ckpt, tmp_path, monkeypatch):
    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert_bad_input(invoke("analyze", ckpt, "--json", tmp_path / "rows.json"), "No space left on device")
    assert not (tmp_path / "rows.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rows.json")]


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("analyze", tmp_path / "nope", "--debug")
    assert result.exit_code != 0 and result.exception is not None and "does not exist" in str(result.exception)


# ----------------------------------------------------------------------------------------- model folders

WORDS = ["[UNK]"] + [f"w{i}" for i in range(63)]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def text_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS[1 + int(i)] for i in torch.randint(0, 63, (150,), generator=g)))
    return path


def reported_ppl(result):
    assert result.exit_code == 0, result.output
    return float(re.findall(r"(\d+\.\d+)\s*│?\s*$", result.stdout, re.M)[-1])


@pytest.mark.parametrize("protocol, stride", [("sliding", None), ("sliding", 8), ("krony", None)])
def test_eval_text_matches_the_python_api(gpt2_dir, text_file, protocol, stride):
    import transformers

    from kronfact.data import load_tokenizer, tokenize_file
    from kronfact.evaluate import perplexity

    args = ["eval", gpt2_dir, "--text", text_file, "--protocol", protocol, "--context", 16]
    if stride:
        args += ["--stride", stride]
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    ids = tokenize_file(text_file, load_tokenizer(gpt2_dir))
    assert ids.numel() == 150
    expected = perplexity(model, ids, context=16, stride=stride, protocol=protocol)
    assert reported_ppl(invoke(*args)) == pytest.approx(expected, rel=1e-3)


def test_eval_lambada_file(gpt2_dir, tmp_path):
    path = tmp_path / "lambada.txt"
    path.write_text("w1 w2 w3 w4\n\nw5 w6 w7\n")
    result = invoke("eval", gpt2_dir, "--text", path, "--lambada")
    assert result.exit_code == 0, result.output
    assert "last-word accuracy" in result.stdout and re.search(r"│\s+2\s+│", result.stdout)


def test_eval_bad_inputs(gpt2_dir, text_file, tmp_path, monkeypatch):
    assert_bad_input(invoke("eval", gpt2_dir), "exactly one of --text FILE or --dataset")
    assert_bad_input(invoke("eval", gpt2_dir, "--text", text_file, "--dataset", "wikitext-2"), "exactly one")
    assert_bad_input(invoke("eval", gpt2_dir, "--dataset", "ptb"), "--dataset must be one of")
    assert_bad_input(invoke("eval", gpt2_dir, "--text", tmp_path / "none.txt"), "does not exist")
    assert_bad_input(invoke("eval", tmp_path / "none", "--text", text_file), "does not exist")
    assert_bad_input(invoke("eval", gpt2_dir, "--text", text_file, "--protocol", "x"), "--protocol must be")
    assert_bad_input(invoke("eval", gpt2_dir, "--text", text_file, "--stride", 64), "stride must be")
    assert_bad_input(invoke("eval", gpt2_dir, "--text", text_file, "--context", 64), "exceeds the model's 32 positions")
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert_bad_input(invoke("eval", gpt2_dir, "--dataset", "wikitext-103"), "datasets", "--text FILE")


def test_eval_refuses_a_corrupt_model_file(gpt2_dir, text_file, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(gpt2_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_bad_input(invoke("eval", broken, "--text", text_file), "truncated")


# ---------------------------------------------------------------------------- compress / merge / info


def test_out_exists_needs_force(gpt2_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_bad_input(invoke("compress", gpt2_dir, "-o", out, "--ratio", "0.8"), "already exists", "--force")
    assert_bad_input(invoke("merge", gpt2_dir, "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_merge_and_info_refuse_an_uncompressed_folder(gpt2_dir, tmp_path):
    assert_bad_input(invoke("merge", gpt2_dir, "-o", tmp_path / "m"), "not a kronfact-compressed folder")
    assert_bad_input(invoke("info", gpt2_dir), "not a kronfact-compressed folder")
    assert_bad_input(invoke("info", tmp_path / "nothing"), "does not exist")


# ------------------------------------------------------------------------------------ the real script


def kronfact_command():
    script = shutil.which("kronfact", path=os.path.dirname(sys.executable)) or shutil.which("kronfact")
    return [script] if script else [sys.executable, "-m", "kronfact.cli"]


def test_installed_script_runs_as_a_subprocess(ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(kronfact_command() + ["analyze", str(ckpt), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())
    bad = subprocess.run(kronfact_command() + ["analyze", str(tmp_path / "missing.safetensors")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"kronfact: error: {tmp_path / 'missing.safetensors'} does not exist"]


@pytest.fixture(scope="module")
def compressed_dir(gpt2_dir, tmp_path_factory):
    pytest.importorskip("kronfact.surgery")
    out = tmp_path_factory.mktemp("compressed") / "out"
    result = invoke("compress", gpt2_dir, "-o", out, "--rules", "mlp.*", "--ratio", "0.8")
    assert result.exit_code == 0, result.output
    return out


def test_compress_writes_a_complete_folder_that_info_and_eval_read(compressed_dir, text_file):
    names = {p.name for p in compressed_dir.iterdir()}
    assert {"config.json", "model.safetensors", "kronfact.json", "tokenizer.json", "compression_report.json"} <= names
    modules = json.loads((compressed_dir / "kronfact.json").read_text())["modules"]
    assert modules and all(".mlp." in m["name"] for m in modules)
    result = invoke("info", compressed_dir)
    assert result.exit_code == 0, result.output
    for m in modules:
        assert m["name"] in result.stdout
    assert reported_ppl(invoke("eval", compressed_dir, "--text", text_file, "--context", 16)) > 1


def test_merge_gives_a_plain_folder_with_the_same_perplexity(compressed_dir, text_file, tmp_path):
    merged = tmp_path / "merged"
    result = invoke("merge", compressed_dir, "-o", merged)
    assert result.exit_code == 0, result.output
    assert not (merged / "kronfact.json").exists() and (merged / "tokenizer.json").exists()
    before = reported_ppl(invoke("eval", compressed_dir, "--text", text_file, "--context", 16))
    after = reported_ppl(invoke("eval", merged, "--text", text_file, "--context", 16))
    assert after == pytest.approx(before, rel=1e-3)


def test_compress_force_replaces_and_a_failed_write_leaves_nothing(gpt2_dir, tmp_path, monkeypatch):
    pytest.importorskip("kronfact.surgery")
    from kronfact import pretrained

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = invoke("compress", gpt2_dir, "-o", out, "--ratio", "0.8", "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "kronfact.json").exists()

    def fail_midway(model, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pretrained, "save_pretrained", fail_midway)
    fresh = tmp_path / "fresh"
    assert_bad_input(invoke("compress", gpt2_dir, "-o", fresh, "--ratio", "0.8"), "No space left on device")
    assert_bad_input(invoke("compress", gpt2_dir, "-o", out, "--ratio", "0.8", "--force"), "No space left")
    assert not fresh.exists()
    assert (out / "kronfact.json").exists()  # the previous OUT is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind


def test_compress_bad_options(gpt2_dir, tmp_path):
    pytest.importorskip("kronfact.surgery")
    assert_bad_input(invoke("compress", gpt2_dir, "-o", tmp_path / "o", "--ratio", "0.5", "--budget", "1e5"),
                     "give --budget", "or --ratio", "not both")
    assert_bad_input(invoke("compress", gpt2_dir, "-o", tmp_path / "o", "--shape-a", "4by4", "--rank", "1"),
                     "--shape-a must look like")
    assert_bad_input(invoke("compress", gpt2_dir, "-o", tmp_path / "o", "--rules", "decoder.*", "--ratio", "0.8"))
    assert not (tmp_path / "o").exists()


def test_compress_with_calibration_text_and_permutations(gpt2_dir, text_file, tmp_path):
    out = tmp_path / "cal"
    result = invoke("compress", gpt2_dir, "-o", out, "--ratio", "0.5", "--calibration-text", text_file,
                    "--calibration-windows", "4", "--calibration-len", "12", "--permute", "2", "--rules", "mlp.c_fc")
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "compression_report.json").read_text())["layers"]
    assert layers and all(r["init"].startswith("calibrated") and ".mlp.c_fc" in r["name"] for r in layers)
    assert reported_ppl(invoke("eval", out, "--text", text_file, "--context", 16)) > 1
    assert_bad_input(invoke("compress", gpt2_dir, "-o", tmp_path / "x", "--ratio", "0.5", "--calibration-text",
                            tmp_path / "missing.txt"), "--calibration-text")
    assert_bad_input(invoke("compress", gpt2_dir, "-o", tmp_path / "x", "--ratio", "0.5", "--calibration-text",
                            text_file, "--calibration-len", "1"), "--calibration-len")
    assert not (tmp_path / "x").exists()


def test_compress_a_safetensors_file_with_config_beside_it(gpt2_dir, text_file, tmp_path):
    out = tmp_path / "from-file"
    result = invoke("compress", gpt2_dir / "model.safetensors", "-o", out, "--ratio", "0.5")
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "kronfact.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert reported_ppl(invoke("eval", out, "--text", text_file, "--context", 16)) > 1
    for bad in ("inf", "nan", "-5"):
        assert_bad_input(invoke("compress", gpt2_dir, "-o", tmp_path / "b", "--budget", bad), "--budget must be")
    assert not (tmp_path / "b").exists()


def test_info_refuses_empty_or_future_metadata(compressed_dir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(compressed_dir, folder)
    meta = json.loads((folder / "kronfact.json").read_text())
    (folder / "kronfact.json").write_text(json.dumps({**meta, "modules": []}))
    assert_bad_input(invoke("info", folder), "lists no compressed module")
    (folder / "kronfact.json").write_text(json.dumps({**meta, "kronfact_format": "99"}))
    assert_bad_input(invoke("info", folder), "format '99'", "upgrade kronfact")


def test_rules_text_splits_at_commas_outside_brackets():
    assert rule_list("mlp.*, !h.0.*") == ["mlp.*", "!h.0.*"]
    assert rule_list(r"re:^h\.\d{1,2}\.mlp$") == [r"re:^h\.\d{1,2}\.mlp$"]
    assert rule_list("re:(c_fc|c_proj)$,!h.0.*") == ["re:(c_fc|c_proj)$", "!h.0.*"]  # the exclusion is kept
    assert rule_list(None) is None


def test_version_and_threads_options(gpt2_dir):
    import kronfact

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip().startswith(f"kronfact {kronfact.__version__}")
    before = torch.get_num_threads()
    try:
        result = invoke("--threads", "1", "analyze", gpt2_dir)
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert invoke("--threads", "0", "analyze", gpt2_dir).exit_code == 2

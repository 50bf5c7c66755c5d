"""Loading never computes on weights it did not read: every corrupt or mismatched file is exit 2, one line."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from test_cli import WORDS, assert_bad_input, invoke, kronfact_command

import kronfact
from kronfact.errors import KronfactError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def compressed(plain, tmp_path_factory):
    out = tmp_path_factory.mktemp("compressed") / "out"
    result = invoke("compress", plain, "-o", out, "--ratio", "0.5", "--json")
    assert result.exit_code == 0, result.output
    return out


def copy_of(folder, tmp_path):
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def edit_header(path, edit):
    """Rewrite a safetensors file's header with ``edit(header)``; the data bytes stay as they were."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def first_weight(header, suffix="mlp.up_proj.weight"):
    return next(k for k in header if k.endswith(suffix))


def refuses(folder, *fragments):
    """The library raises KronfactError; eval and compress exit 2 with one line; nothing is written."""
    with pytest.raises(KronfactError):
        kronfact.from_pretrained(folder)
    text = folder.parent / "t.txt"
    text.write_text("w1 w2 w3 " * 50)
    assert_bad_input(invoke("eval", folder, "--text", text), *fragments)
    out = folder.parent / "never"
    assert_bad_input(invoke("compress", folder, "-o", out, "--ratio", "0.5"), *fragments)
    assert not out.exists()


def test_a_compressed_folder_without_kronfact_json(compressed, tmp_path):
    folder = copy_of(compressed, tmp_path)
    (folder / "kronfact.json").unlink()
    refuses(folder, "missing from the file", "without its kronfact.json")


def test_an_integer_dtype_where_weights_are_floats(plain, tmp_path):
    folder = copy_of(plain, tmp_path)
    edit_header(folder / "model.safetensors", lambda h: h[first_weight(h)].update(dtype="I32"))
    refuses(folder, "integer or bool tensors", "(I32)")


def test_a_transposed_tensor(plain, tmp_path):
    folder = copy_of(plain, tmp_path)
    edit_header(folder / "model.safetensors",
                lambda h: h[first_weight(h)].update(shape=h[first_weight(h)]["shape"][::-1]))
    refuses(folder, "shapes that do not fit its config.json", "up_proj")


def test_a_config_that_does_not_fit_the_weights(plain, tmp_path):
    folder = copy_of(plain, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    refuses(folder, "shapes that do not fit its config.json")


def test_extra_bytes_after_the_data(plain, tmp_path):
    folder = copy_of(plain, tmp_path)
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    refuses(folder, "16 bytes after the last tensor")


def test_an_unknown_dtype(plain, tmp_path):
    folder = copy_of(plain, tmp_path)
    edit_header(folder / "model.safetensors", lambda h: h[first_weight(h)].update(dtype="F33"))
    refuses(folder, "dtype 'F33'")


def test_a_removed_header_entry(plain, tmp_path):
    folder = copy_of(plain, tmp_path)

    def remove_one_in_the_middle(header):
        tensors = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
        del header[tensors[len(tensors) // 2][1]]

    edit_header(folder / "model.safetensors", remove_one_in_the_middle)
    refuses(folder, "belong to no tensor")


def test_a_missing_tensor_written_cleanly(plain, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(plain, tmp_path)
    state = load_file(folder / "model.safetensors")
    del state[first_weight(state, "mlp.down_proj.weight")]
    save_file(state, folder / "model.safetensors", {"format": "pt"})
    refuses(folder, "missing from the file", "down_proj")


def test_a_kronfact_file_with_an_integer_factor(compressed, tmp_path):
    folder = copy_of(compressed, tmp_path)
    edit_header(folder / "model.safetensors", lambda h: h[first_weight(h, ".a")].update(dtype="I32"))
    refuses(folder, "is I32 in the file but torch.float32 in the model")


def test_info_checks_kronfact_json_against_the_weights(compressed, tmp_path):
    folder = copy_of(compressed, tmp_path)
    meta = json.loads((folder / "kronfact.json").read_text())
    meta["modules"][0]["rank"] += 1
    (folder / "kronfact.json").write_text(json.dumps(meta))
    assert_bad_input(invoke("info", folder), "disagree on the compressed modules")
    folder = copy_of(compressed, tmp_path / "second")
    edit_header(folder / "model.safetensors", lambda h: h[first_weight(h, ".a")].update(
        shape=h[first_weight(h, ".a")]["shape"][::-1]))
    assert_bad_input(invoke("info", folder), "does not hold what kronfact.json describes")


def test_no_transformers_report_reaches_the_terminal(compressed, tmp_path):
    folder = copy_of(compressed, tmp_path)
    (folder / "kronfact.json").unlink()
    (tmp_path / "t.txt").write_text("w1 w2 " * 40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(kronfact_command() + ["eval", str(folder), "--text", str(tmp_path / "t.txt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "LOAD REPORT" not in done.stderr, done.stderr


def test_json_outputs_are_complete_and_agree(compressed, tmp_path):
    report = json.loads((compressed / "compression_report.json").read_text())
    info = invoke("info", compressed, "--json")
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert [m["name"] for m in data["modules"]] == sorted(r["name"] for r in report["layers"])
    assert data["parameters"] == sum(p.numel() for p in kronfact.from_pretrained(compressed).parameters())
    assert all(m["params"] < m["dense_params"] for m in data["modules"])
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3 " * 50)
    ev = invoke("eval", compressed, "--text", text, "--json", "--context", 16)
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["context"] == 16


def test_cheap_checks_run_before_loading(plain, tmp_path, monkeypatch):
    import kronfact.cli.models as cli

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr(cli, "load_model", never)
    (tmp_path / "out").mkdir()
    assert_bad_input(invoke("compress", plain, "-o", tmp_path / "out", "--ratio", "0.5"), "--force")
    assert_bad_input(invoke("compress", plain, "-o", tmp_path / "no" / "out", "--ratio", "0.5"), "does not exist")
    assert_bad_input(invoke("compress", plain, "-o", tmp_path / "o2", "--method", "x"), "--method must be")
    assert_bad_input(invoke("compress", plain, "-o", tmp_path / "o2", "--calibration-text", tmp_path / "none.txt",
                            "--ratio", "0.5"), "--calibration-text")


def test_library_errors_name_the_flags(plain, tmp_path):
    result = invoke("compress", plain, "-o", tmp_path / "o", "--method", "neurons", "--ratio", "0.5")
    assert_bad_input(result, "--method neurons needs --calibration-text")
    assert "=" not in result.stderr.split("error:")[1].split("shape_a")[0]


def test_the_frobenius_warning_is_one_line_with_flags(plain, tmp_path):
    result = invoke("compress", plain, "-o", tmp_path / "o", "--ratio", "0.5")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("kronfact: warning:")]
    assert len(warning) == 1 and "--calibration-text" in warning[0]


def test_a_lone_safetensors_file_loads_as_strictly(plain, tmp_path):
    folder = copy_of(plain, tmp_path)
    file = folder / "model.safetensors"
    model, reference = kronfact.from_pretrained(file), kronfact.from_pretrained(plain)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    edit_header(file, lambda h: h[first_weight(h)].update(dtype="I32"))
    with pytest.raises(KronfactError, match="I32"):
        kronfact.from_pretrained(file)
    assert_bad_input(invoke("compress", file, "-o", tmp_path / "o", "--ratio", "0.5"), "I32")

"""Recipes: every file in recipes/ validates; the GPT-2 Krony-PT recipes reproduce the paper's factor shapes
and parameter labels; overrides are typed and checked; a recipe runs end to end on the shared tiny GPT-2."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from kronfact.cli.recipe import recipe_app  # noqa: E402
from kronfact.layer import KronLinear  # noqa: E402
from kronfact.modules import count_parameters  # noqa: E402
from kronfact.pretrained import from_pretrained  # noqa: E402
from kronfact.recipe import load_recipe  # noqa: E402
from kronfact.run import run_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(RECIPES.glob("*.toml"))

# Krony-PT's configurations as the paper writes them: GPT-2's c_fc Conv1D weight (768 × 3072) = A (p×q) ⊗ B,
# c_proj (3072 × 768) mirrored; label = the paper's parameter count (position table left out).
PAPER = {
    "gpt2-krony-67m": ((128, 32), (6, 96), 1, "vanloan", 67),
    "gpt2-krony-80m": ((256, 1024), (3, 3), 2, "vanloan", 80),
    "gpt2-krony-81m": ((768, 768), (1, 4), 1, "vanloan", 81),
    "gpt2-krony-92m": ((256, 1024), (3, 3), 4, "vanloan", 92),
    "gpt2-krony-95m": ((384, 3072), (2, 1), 1, "prune", 95),
}


def test_recipes_exist_for_every_family():
    names = {load_recipe(p).name for p in ALL}
    assert set(PAPER) <= names and "gpt2-budget-81m" in names
    kinds = {load_recipe(p).model.kind for p in ALL}
    assert kinds == {"causal", "encoder", "vision"}
    text = " ".join(p.read_text() for p in ALL)
    for family in ("bert-base-uncased", "all-MiniLM-L6-v2", "gate_proj", "opt-125m", "vit-base"):
        assert family in text


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_every_recipe_parses_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.model.name and recipe.source == str(path)
    rules = recipe.rules()
    assert rules
    kwargs = recipe.compress_kwargs()
    assert ("budget" in kwargs) + ("ratio" in kwargs) <= 1
    if recipe.train is not None:
        assert recipe.train.config.tokens > 0 and recipe.train.data


def test_budget_recipe_counts_in_full():
    recipe = load_recipe(RECIPES / "gpt2-budget-81m.toml")
    assert recipe.rules() == "mlp.*" and recipe.compress_kwargs()["budget"] == 81_000_000


@pytest.fixture(scope="module")
def gpt2_124m_meta():
    """GPT-2 124M (transformers' default GPT2Config) on the meta device: its architecture, no memory."""
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(transformers.GPT2Config())


@pytest.fixture(scope="module")
def gpt2_block():
    """A one-block GPT-2 with GPT-2 124M's MLP dimensions (768 → 3072 → 768), small vocabulary."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_krony_pt_recipes_reproduce_the_paper_shapes_and_labels(name, gpt2_block, gpt2_124m_meta):
    import copy

    from kronfact.surgery import compress

    (p, q), (s, t), rank, init, label = PAPER[name]
    assert (p * s, q * t) == (768, 3072)  # the paper's c_fc, Conv1D orientation
    recipe = load_recipe(RECIPES / f"{name}.toml")
    model = copy.deepcopy(gpt2_block)
    before = count_parameters(model)
    compress(model, recipe.rules(), **recipe.compress_kwargs())
    fc, proj = model.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_proj
    assert isinstance(fc, KronLinear) and isinstance(proj, KronLinear)
    # nn.Linear orientation: c_fc (3072, 768) = Aᵀ ⊗ Bᵀ; c_proj (768, 3072) the mirror
    assert (fc.shape_a, fc.shape_b, fc.rank) == ((q, p), (t, s), rank)
    assert (proj.shape_a, proj.shape_b, proj.rank) == ((p, q), (s, t), rank)
    assert fc.orientation == proj.orientation == "conv1d"
    x = torch.randint(0, 64, (1, 8))
    assert torch.isfinite(model(x).logits).all()

    saved_per_block = before - count_parameters(model)
    full = count_parameters(gpt2_124m_meta) - gpt2_124m_meta.config.n_layer * saved_per_block
    positions = gpt2_124m_meta.transformer.wpe.weight.numel()
    assert count_parameters(gpt2_124m_meta) == 124_439_808 and positions == 786_432
    assert abs((full - positions) / 1e6 - label) <= 1.0  # Krony-PT's label leaves the position table out
    if name == "gpt2-krony-81m":
        assert round(full / 1e4) / 100 == 81.97  # "81M" is 81.97M counted in full


def test_overrides_are_typed_and_merged():
    recipe = load_recipe(RECIPES / "gpt2-krony-81m.toml",
                         ["train.lr=1e-3", "model.name=gpt2-medium", "train.tokens=2e6", 'eval.sets=["x.txt"]',
                          'compress.layers."mlp.c_fc".rank=2', "train.distill=true", "output.dir=/tmp/out"])
    c = recipe.train.config
    assert c.lr == 1e-3 and isinstance(c.lr, float) and c.tokens == 2_000_000 and isinstance(c.tokens, int)
    assert c.distill is True and recipe.model.name == "gpt2-medium" and recipe.eval.sets == ["x.txt"]
    assert recipe.rules()["mlp.c_fc"]["rank"] == 2 and recipe.rules()["mlp.c_proj"]["rank"] == 1
    assert recipe.out_dir == Path("/tmp/out")


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("compress.budgett=5", "unknown key 'compress.budgett'"),
    ("train.lr=fast", "'train.lr' must be float"),
    ("train.tokens=1.5", "'train.tokens' must be int"),
    ("compress.init=svd", "'compress.init' must be"),
    ("compress.ratio=0.5", "give compress.budget .* or compress.ratio .*, not both"),
    ("train.batch_size=0", "batch_size=0"),
    ("novalue", "key=value"),
])
def test_bad_overrides_name_the_file_and_key(override, message):
    path = RECIPES / "gpt2-budget-81m.toml"
    with pytest.raises(ValueError, match=message) as err:
        load_recipe(path, [override])
    if "=" in override:
        assert str(path) in str(err.value) and "--set" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ('name = "x"\n[compress]\nrules = "mlp.*"\n', "missing required key 'model'"),
    ('name = "x"\n[model]\nkind = "causal"\n[compress]\n', "missing required key 'model.name'"),
    ('name = "x"\nfoo = 1\n[model]\nname = "m"\n[compress]\n', "unknown key 'foo'"),
    ('name = "x"\n[model]\nname = "m"\n[compress]\n[train]\ntokens = 5\n', "missing required key 'train.data'"),
    ('name = "x"\n[model]\nname = "m"\nkind = "vision"\n[compress]\n[train]\ndata = "d"\n', "not vision"),
    ('name = "x"\n[model]\nname = "m"\n[compress]\nrules = "a"\n[compress.layers.b]\nrank = 1\n', "not both"),
    ('name = "x"\n[model\n', "not valid TOML"),
    ('name = "x"\n[model]\nname = "m"\n[compress]\ncalibration = "t.txt"\ncalibration_windows = 0\n',
     "calibration_windows must be ≥ 1"),
    ('name = "x"\n[model]\nname = "m"\n[compress]\nmethod = "magic"\n', "compress.method"),
])
def test_invalid_recipes_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path):
    result = CliRunner().invoke(recipe_app, ["run", str(RECIPES / "gpt2-krony-81m.toml"), "--set", "train.lrr=1"])
    assert result.exit_code == 2
    assert "unknown key 'train.lrr'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(recipe_app, ["show", str(RECIPES / "gpt2-krony-81m.toml"), "--set", "train.lr=1e-3"])
    assert result.exit_code == 0 and '"lr": 0.001' in result.output


@pytest.mark.slow
def test_shakespeare_recipe_runs_end_to_end(tiny_gpt2_dir, shakespeare_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's paths are relative to the recipe file, not the working directory
    out = tmp_path / "run"
    result = run_recipe(RECIPES / "shakespeare-tiny.toml", overrides=[
        "train.tokens=4096", "train.batch_size=4", "train.seq_len=64", "eval.max_tokens=3000", f"output.dir={out}",
        "train.progress=false", "train.eval_tokens=2000"])
    original = count_parameters(transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir))
    assert result.params <= 0.66 * original + 1 and result.params >= 0.65 * original
    assert result.train.steps == 4096 // (4 * 64) and result.train.tokens == 4096
    ppl = result.evals[str(shakespeare_dir / "val.txt")]["perplexity"]
    assert math.isfinite(ppl) and ppl > 1
    # the held-out tail of train.txt validates from step 0, and the weights kept are never worse on it
    t = result.train
    assert t.initial_val is not None and t.best_val <= t.initial_val
    assert set(result.evals_before_training) == set(result.evals)
    # the saved folder is a working compressed model with the same numbers
    saved = json.loads((out / "results.json").read_text())
    assert saved["params"] == result.params and saved["evals"] == json.loads(json.dumps(result.evals))
    model = from_pretrained(out / "model")
    assert count_parameters(model) == result.params
    assert any(isinstance(m, KronLinear) for m in model.modules())
    assert (out / "model" / "tokenizer.json").exists() and (out / "train" / "last" / "state.json").exists()
    from kronfact.data import load_tokenizer, tokenize_file
    from kronfact.evaluate import perplexity

    ids = tokenize_file(shakespeare_dir / "val.txt", load_tokenizer(out / "model"))[:3000]
    assert perplexity(model, ids, context=256, stride=128) == pytest.approx(ppl, rel=1e-5)
    assert os.environ.get("RANK") is None


@pytest.mark.slow
def test_recipe_run_prints_validation_and_evaluations_before_and_after(tiny_gpt2_dir, shakespeare_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(recipe_app, [
        "run", str(RECIPES / "shakespeare-tiny.toml"), "-o", str(out), "--set", "train.tokens=2048",
        "--set", "train.batch_size=4", "--set", "train.seq_len=64", "--set", "eval.max_tokens=2000",
        "--set", "train.progress=false", "--set", "train.eval_every=2", "--set", "train.eval_tokens=2000"])
    assert result.exit_code == 0, result.output
    assert "before training →" in result.output and "kept" in result.output
    assert "before training" in result.output and "after training" in result.output  # the table's columns
    saved = json.loads((out / "results.json").read_text())
    assert saved["train"]["initial_val"] is not None and saved["train"]["best_val"] <= saved["train"]["initial_val"]
    assert saved["evals_before_training"].keys() == saved["evals"].keys()


def test_a_run_that_cannot_resume_fails_before_loading_the_model(tmp_path, monkeypatch):
    import kronfact.run as run

    last = tmp_path / "run" / "train" / "last"
    last.mkdir(parents=True)
    recipe = load_recipe(RECIPES / "shakespeare-tiny.toml", [f"output.dir={tmp_path / 'run'}"])
    saved = {k: getattr(recipe.train.config, k) for k in ("tokens", "seq_len", "batch_size")}
    (last / "state.json").write_text(json.dumps({"format": 1, "world_size": 1, "config": {**saved, "lr": 1.0}}))

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the resume check")

    monkeypatch.setattr(run, "_load_model", never)
    with pytest.raises(ValueError, match="cannot resume .* lr"):
        run_recipe(RECIPES / "shakespeare-tiny.toml", overrides=[f"output.dir={tmp_path / 'run'}"])


# --------------------------------------------------------------------------- the other families' recipes


def _is_bert_mlp(name: str) -> bool:
    """BERT / ViT (transformers < 5) MLPs: intermediate.dense and the block's own output.dense, never
    attention.output.dense."""
    return name.endswith("intermediate.dense") or (name.endswith("output.dense") and "attention" not in name)


# recipe file stem → (model kind, tiny local config, which module names are the MLP layers it must compress,
# attention projections that must stay dense)
FAMILIES = {
    "bert-base": ("encoder", lambda: transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100),
        _is_bert_mlp, ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense")),
    "minilm-l6": ("encoder", lambda: transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100),
        _is_bert_mlp, ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense")),
    "llama": ("causal", lambda: transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64),
        lambda n: n.endswith(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
    "opt-125m": ("causal", lambda: transformers.OPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, vocab_size=100,
        word_embed_proj_dim=32, max_position_embeddings=64),
        lambda n: n.endswith((".fc1", ".fc2")),
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")),
    # transformers ≥ 5 names ViT's MLP mlp.fc1 / mlp.fc2 (earlier: intermediate.dense / output.dense)
    "vit-base": ("vision", lambda: transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=8),
        lambda n: n.endswith(("mlp.fc1", "mlp.fc2")) or _is_bert_mlp(n),
        ("q_proj", "k_proj", "v_proj", "o_proj", "attention.query", "attention.key", "attention.value",
         "attention.output.dense")),
}
GPT2_FAMILY = set(PAPER) | {"gpt2-budget-81m", "shakespeare-tiny"}
CALIBRATED = {"smollm2-135m"}  # data-aware recipes, run end to end below on the shared tiny GPT-2


def test_every_recipe_is_covered_by_a_family_test():
    stems = {p.stem for p in ALL}
    assert stems == GPT2_FAMILY | set(FAMILIES) | CALIBRATED, "a new recipe needs a tiny-model test here"
    assert GPT2_FAMILY.isdisjoint(FAMILIES) and CALIBRATED.isdisjoint(GPT2_FAMILY | set(FAMILIES))


@pytest.mark.parametrize("stem", sorted(FAMILIES))
def test_family_recipe_compresses_the_mlps_and_leaves_attention_dense(stem):
    from kronfact.modules import is_eligible
    from kronfact.surgery import compress

    kind, make_config, is_mlp, attention = FAMILIES[stem]
    recipe = load_recipe(RECIPES / f"{stem}.toml")
    assert recipe.model.kind == kind
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel  # as run_recipe loads
    model = auto.from_config(make_config())
    eligible = {n for n, m in model.named_modules() if is_eligible(m)}
    mlps = {n for n in eligible if is_mlp(n)}
    attn = {n for n in eligible if n.endswith(attention)}
    assert len(mlps) in (4, 6) and len(attn) == 8  # 2 (Llama: 3) MLP layers and 4 attention projections per block
    kwargs = recipe.compress_kwargs()
    if "budget" in kwargs:  # an absolute count for the full-size model: ask the tiny one for half of its MLPs
        mlp_params = sum(p.numel() for n in mlps for p in model.get_submodule(n).parameters())
        kwargs["budget"] = count_parameters(model) - mlp_params // 2
    before = count_parameters(model)
    report = compress(model, recipe.rules(), **kwargs, progress=False)
    kron = {n for n, m in model.named_modules() if isinstance(m, KronLinear)}
    assert kron == mlps and not report.kept_dense
    for name in eligible - mlps:  # attention, pooler, heads: untouched nn.Linear
        assert type(model.get_submodule(name)) is torch.nn.Linear, name
    assert attn <= eligible - mlps
    assert count_parameters(model) < before
    if "ratio" in kwargs:
        kept = sum(p.numel() for n in mlps for p in model.get_submodule(n).parameters())
        assert kept <= kwargs["ratio"] * sum(
            p.numel() for n in mlps for p in auto.from_config(make_config()).get_submodule(n).parameters())


def test_a_bare_output_dense_rule_would_catch_bert_attention():
    """Why the BERT recipes anchor their rule: the bare name also selects attention.output.dense."""
    from kronfact.rules import Rule

    assert Rule("output.dense").matches("encoder.layer.0.attention.output.dense")
    anchored = Rule(r"re:layer\.\d+\.output\.dense$")
    assert anchored.matches("encoder.layer.0.output.dense")
    assert not anchored.matches("encoder.layer.0.attention.output.dense")


def test_layer_rules_take_max_rank(tmp_path):
    from kronfact.surgery import compress

    path = tmp_path / "capped.toml"
    path.write_text('name = "capped"\n[model]\nname = "m"\n[compress]\nratio = 0.5\n'
                    '[compress.layers."mlp.gate_proj"]\nmax_rank = 1\n'
                    '[compress.layers."mlp.up_proj"]\n[compress.layers."mlp.down_proj"]\n')
    recipe = load_recipe(path)
    assert recipe.rules()["mlp.gate_proj"] == {"max_rank": 1} and recipe.rules()["mlp.up_proj"] == {}
    _, make_config, _, _ = FAMILIES["llama"]

    def ranks(rules):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make_config())
        compress(model, rules, **recipe.compress_kwargs(), progress=False)
        return {n.rsplit(".", 1)[-1]: m.rank for n, m in model.named_modules() if isinstance(m, KronLinear)}

    free = ranks({"mlp.gate_proj": {}, "mlp.up_proj": {}, "mlp.down_proj": {}})
    capped = ranks(recipe.rules())
    assert free["gate_proj"] > 1 and capped["gate_proj"] == 1  # the cap binds, and only where it is set
    assert capped["up_proj"] > 1
    with pytest.raises(ValueError, match="max_rank"):
        load_recipe(path, ['compress.layers."mlp.gate_proj".max_rank=1.5'])


def test_recipe_paths_resolve_against_the_recipe_file(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "data.txt").write_text("text")
    (folder / "r.toml").write_text('name = "r"\n[model]\nname = "org/hub-id"\n[compress]\nratio = 0.5\n'
                                   'calibration = "data.txt"\n[train]\ndata = "../elsewhere/train.txt"\n'
                                   'holdout = 0.1\n[eval]\nsets = ["wikitext-2", "lambada:data.txt"]\n')
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(folder / "r.toml")
    assert recipe.model.name == "org/hub-id"  # a hub id, not a path
    assert recipe.compress.calibration == str(folder / "data.txt")
    assert recipe.train.data == str(tmp_path / "elsewhere" / "train.txt")
    assert recipe.eval.sets == ["wikitext-2", f"lambada:{folder / 'data.txt'}"]
    assert recipe.out_dir == folder / "runs" / "r"
    typed = load_recipe(folder / "r.toml", ["train.data=./mine.txt", "output.dir=out"])
    assert typed.train.data == str(tmp_path / "mine.txt") and typed.out_dir == tmp_path / "out"  # typed: cwd
    with pytest.raises(ValueError, match="train.holdout"):
        load_recipe(folder / "r.toml", ["train.holdout=1.5"])
    with pytest.raises(ValueError, match="val_data or train.holdout"):
        load_recipe(folder / "r.toml", ["train.val_data=data.txt"])


@pytest.mark.slow
def test_calibrated_recipe_prunes_neurons_end_to_end(tiny_gpt2_dir, shakespeare_dir, tmp_path, monkeypatch):
    from kronfact.prune import PrunedLinear

    monkeypatch.chdir(tmp_path)  # the recipe's paths are relative to the recipe file, not the working directory
    out = tmp_path / "run"
    result = run_recipe(RECIPES / "smollm2-135m.toml", model=tiny_gpt2_dir, overrides=[
        "compress.calibration_windows=8", "compress.calibration_len=64", "train.tokens=1024", "train.seq_len=64",
        "eval.max_tokens=2000", "eval.context=256", "eval.stride=256", f"output.dir={out}", "train.progress=false"])
    original = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    mlp = {n: m for n, m in original.named_modules() if n.endswith(("mlp.c_fc", "mlp.c_proj"))}
    assert {r.init for r in result.report.layers} == {"neurons"} and len(result.report.layers) == len(mlp)
    model = from_pretrained(out / "model")
    assert count_parameters(model) == result.params
    kept = sum(p.numel() for n in mlp for p in model.get_submodule(n).parameters())
    assert kept <= 0.5 * sum(p.numel() for m in mlp.values() for p in m.parameters())
    assert all(isinstance(model.get_submodule(n), PrunedLinear) for n in mlp)
    assert not any(isinstance(m, KronLinear) for m in model.modules())
    assert result.train.tokens == 1024
    assert math.isfinite(result.evals[str(shakespeare_dir / "val.txt")]["perplexity"])


"""compress → save_pretrained → from_pretrained → merge on real transformers architectures.

Tiny random configs built locally (no download): GPT-2 (Conv1D MLPs, tied head), BERT (MLM head tied),
Llama (gate/up/down), OPT (fc1/fc2) and ViT. Each: compress the MLPs under a budget; the model runs; the
report's totals equal a full parameter count; the saved folder reloads to bit-identical tensors and
outputs; generate() and a training step work on the reloaded model; merge gives the same outputs within
fp tolerance; the merged model saved is a plain checkpoint that transformers itself loads.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import kronfact  # noqa: E402
from kronfact import io  # noqa: E402
from kronfact.layer import KronLinear  # noqa: E402
from kronfact.modules import count_parameters, is_conv1d  # noqa: E402
from kronfact.surgery import compress  # noqa: E402

VOCAB = 64
# BERT: "output.dense" alone would also match "attention.output.dense" — anchor it.
BERT_MLP = ["intermediate.dense", r"re:layer\.\d+\.output\.dense$"]


@dataclass
class Arch:
    build: Callable[[], nn.Module]
    rules: str | list[str]
    mlp: Callable[[int], list[str]]  # the modules the rules must select in layer i
    inputs: Callable[[], dict[str, torch.Tensor]]
    causal_lm: bool = False


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))}


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


T = transformers
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32}
ARCHS = {
    "gpt2": Arch(lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                                                        n_positions=32, bos_token_id=0, eos_token_id=0)),
                 "mlp.*", lambda i: [f"transformer.h.{i}.mlp.c_fc", f"transformer.h.{i}.mlp.c_proj"], _ids, True),
    "bert": Arch(lambda: T.BertForMaskedLM(T.BertConfig(**SMALL, intermediate_size=64, vocab_size=VOCAB,
                                                        max_position_embeddings=32)),
                 BERT_MLP, lambda i: [f"bert.encoder.layer.{i}.intermediate.dense",
                                      f"bert.encoder.layer.{i}.output.dense"], _ids),
    "llama": Arch(lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, intermediate_size=64, vocab_size=VOCAB,
                                                           num_key_value_heads=2, max_position_embeddings=32,
                                                           bos_token_id=0, eos_token_id=1, pad_token_id=2)),
                  "mlp.*", lambda i: [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")], _ids,
                  True),
    "opt": Arch(lambda: T.OPTForCausalLM(T.OPTConfig(**SMALL, ffn_dim=64, vocab_size=VOCAB, word_embed_proj_dim=32,
                                                     max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                                     pad_token_id=2)),
                ["fc1", "fc2"], lambda i: [f"model.decoder.layers.{i}.fc1", f"model.decoder.layers.{i}.fc2"], _ids,
                True),
    "vit": Arch(lambda: T.ViTModel(T.ViTConfig(**SMALL, intermediate_size=64, image_size=16, patch_size=8)),
                "mlp.*", lambda i: [f"layers.{i}.mlp.fc1", f"layers.{i}.mlp.fc2"], _pixels),
}


def main_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return main_output(model, inputs)


def kron_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, KronLinear)}


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def training_step_reaches_factors(model: nn.Module, inputs: dict[str, torch.Tensor], causal_lm: bool) -> None:
    model.train()
    if causal_lm:
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    else:
        loss = main_output(model, inputs).square().mean()
    loss.backward()
    for name in kron_names(model):
        layer = model.get_submodule(name)
        assert layer.a.grad is not None and layer.b.grad is not None, name
        assert torch.isfinite(layer.a.grad).all() and layer.a.grad.abs().sum() > 0, name
    model.eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_compress_save_load_merge(arch, tmp_path):
    spec = ARCHS[arch]
    torch.manual_seed(0)
    model = spec.build().eval()
    inputs = spec.inputs()
    mlp = {name for i in range(2) for name in spec.mlp(i)}
    selected = sum(p.numel() for name in mlp for p in model.get_submodule(name).parameters())
    before = count_parameters(model)
    budget = before - selected // 2
    original = run(model, inputs)

    report = compress(model, spec.rules, budget=budget)

    assert kron_names(model) == mlp
    assert not any(m.training for m in model.modules())  # eval mode kept (KronLinear's path depends on it)
    after = count_parameters(model)
    assert (report.params_before, report.params_after) == (before, after)
    assert after == sum(p.numel() for p in model.parameters())  # an independent count (torch dedups tied ones)
    new = sum(p.numel() for name in mlp for p in model.get_submodule(name).parameters())
    assert after == before - selected + new  # only the selected layers changed
    assert sum(r.params_before - r.params_after for r in report.layers) == selected - new
    assert budget * 0.99 <= after <= budget
    compressed = run(model, inputs)
    assert compressed.shape == original.shape and torch.isfinite(compressed).all()
    if arch == "gpt2":
        assert {model.get_submodule(n).orientation for n in mlp} == {"conv1d"}

    # save_pretrained → from_pretrained: same structure, bit-identical tensors and outputs
    kronfact.pretrained.save_pretrained(model, tmp_path / "compressed")
    loaded = kronfact.pretrained.from_pretrained(tmp_path / "compressed")
    assert type(loaded) is type(model) and not loaded.training
    assert io.compressed_modules(loaded) == io.compressed_modules(model)
    assert_same_tensors(loaded, model)
    assert count_parameters(loaded) == after  # tied tensors are still shared
    assert torch.equal(run(loaded, inputs), compressed)
    if spec.causal_lm:
        prompt = inputs["input_ids"][:1]
        greedy = {"max_new_tokens": 4, "do_sample": False}
        assert torch.equal(loaded.generate(prompt, **greedy), model.generate(prompt, **greedy))
    training_step_reaches_factors(loaded, inputs, spec.causal_lm)

    # merge: the original layer types, the same function
    assert kronfact.io.merge(model) is model
    assert not kron_names(model)
    for name in mlp:
        assert is_conv1d(model.get_submodule(name)) == (arch == "gpt2")
    merged = run(model, inputs)
    torch.testing.assert_close(merged, compressed, rtol=1e-4, atol=1e-5)

    # a merged model saved is a plain transformers checkpoint
    kronfact.pretrained.save_pretrained(model, tmp_path / "merged")
    assert not (tmp_path / "merged" / io.KRONFACT_JSON).exists()
    plain = type(model).from_pretrained(tmp_path / "merged").eval()
    assert_same_tensors(plain, model)
    assert torch.equal(run(plain, inputs), merged)
    assert torch.equal(run(kronfact.pretrained.from_pretrained(tmp_path / "merged"), inputs), merged)


def test_tiny_gpt2_shakespeare_compress_save_generate(tiny_gpt2_dir, tmp_path):
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_gpt2_dir / "tokenizer.json"))
    before = count_parameters(model)
    report = compress(model, "mlp.*", budget=int(0.66 * before))
    assert report.params_after == count_parameters(model) <= 0.66 * before
    assert len(kron_names(model)) == 2 * model.config.n_layer

    kronfact.pretrained.save_pretrained(model, tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = kronfact.pretrained.from_pretrained(tmp_path / "ckpt")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    prompt = tok("ROMEO:", return_tensors="pt").input_ids
    assert prompt.numel() > 0
    out = loaded.generate(prompt, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 12)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=12, do_sample=False))
    assert isinstance(tok.decode(out[0, prompt.shape[1]:]), str)
    assert_same_tensors(loaded, model)

"""Module selection: globs on names and dotted suffixes, regexes, exclusions, options, heads, ties, errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronfact.rules import Rule, parse_rules, select

transformers = pytest.importorskip("transformers")


def names(targets):
    return [t.name for t in targets]


class Block(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.proj = nn.Linear(2 * d, d)


class Stack(nn.Module):
    """h.0 … h.11, each with fc / act / proj, plus an input embedding and an (optionally tied) head."""

    def __init__(self, blocks=12, tie=True):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.h = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.wte.weight

    def get_output_embeddings(self):  # as transformers models do
        return self.head


@pytest.fixture(scope="module")
def gpt2():
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=32, max_position_embeddings=16)
    return transformers.BertModel(config, add_pooling_layer=False)


@given(parts=st.lists(st.sampled_from(["h", "0", "1", "11", "mlp", "c_fc", "attn"]), min_size=1, max_size=5),
       cut=st.integers(0, 4))
@settings(max_examples=60, deadline=None)
def test_a_literal_pattern_matches_exactly_the_names_it_ends(parts, cut):
    name = ".".join(parts)
    suffix = ".".join(parts[min(cut, len(parts) - 1):])
    assert Rule(suffix).matches(name)
    assert Rule(suffix).matches("prefix." + name)
    assert not Rule(suffix + "x").matches(name)  # whole components only: no partial-word match
    assert not Rule("x" + suffix).matches(name)


def test_glob_matches_the_qualified_name_or_a_dotted_suffix(gpt2):
    assert names(select(gpt2, "mlp.*")) == [f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")]
    assert names(select(gpt2, "h.0.mlp.c_fc")) == ["transformer.h.0.mlp.c_fc"]
    assert names(select(gpt2, "transformer.h.1.*")) == [f"transformer.h.1.{p}" for p in
                                                         ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    stack = Stack()
    assert names(select(stack, "h.1.fc")) == ["h.1.fc"]  # not h.11.fc
    assert names(select(stack, "h.1?.fc")) == ["h.10.fc", "h.11.fc"]


def test_regex_is_searched_and_can_be_anchored():
    stack = Stack()
    assert names(select(stack, r"re:h\.1\.")) == ["h.1.fc", "h.1.proj"]
    assert names(select(stack, r"re:^h\.1[01]\.fc$")) == ["h.10.fc", "h.11.fc"]
    assert len(select(stack, "re:proj")) == 12


def test_exclusions_apply_wherever_they_are_listed(gpt2):
    every = names(select(gpt2, "mlp.*"))
    for rules in (["mlp.*", "!h.0.mlp.c_fc"], ["!h.0.mlp.c_fc", "mlp.*"]):
        assert names(select(gpt2, rules)) == [n for n in every if n != "transformer.h.0.mlp.c_fc"]
    assert names(select(gpt2, ["mlp.*", r"!re:\.c_proj$"])) == [n for n in every if n.endswith("c_fc")]


def test_dict_options_merge_in_order_later_patterns_winning(gpt2):
    targets = select(gpt2, {"mlp.*": {"rank": 2, "init": "prune"}, "h.1.mlp.c_fc": {"rank": 5}, "c_proj": None})
    opts = {t.name: t.options for t in targets}
    assert opts["transformer.h.1.mlp.c_fc"] == {"rank": 5, "init": "prune"}
    assert opts["transformer.h.0.mlp.c_fc"] == {"rank": 2, "init": "prune"}
    assert opts["transformer.h.0.attn.c_proj"] == {}
    assert opts["transformer.h.0.mlp.c_proj"] == {"rank": 2, "init": "prune"}


def test_bert_output_dense_trap(bert):
    bare = names(select(bert, "output.dense"))
    assert "encoder.layer.0.attention.output.dense" in bare and "encoder.layer.0.output.dense" in bare
    mlp = [f"encoder.layer.{i}.{p}.dense" for i in range(2) for p in ("intermediate", "output")]
    for rules in (["intermediate.dense", r"re:layer\.\d+\.output\.dense$"],
                  ["intermediate.dense", "output.dense", "!attention.output.dense"]):
        assert names(select(bert, rules)) == mlp


def test_non_eligible_modules_are_skipped_by_wildcards_and_an_error_when_named(gpt2):
    assert all(not n.endswith("act") for n in names(select(gpt2, "mlp.*")))
    with pytest.raises(ValueError, match=r"'h\.0\.mlp\.act' matches no layer kronfact can replace.*NewGELU"):
        select(gpt2, "h.0.mlp.act")
    with pytest.raises(ValueError, match=r"inside, use 'h\.0\.mlp\.\*'"):
        select(gpt2, "h.0.mlp")


def test_a_pattern_matching_nothing_lists_the_closest_names(gpt2, bert):
    with pytest.raises(ValueError, match=r"'mlp\.c_fcc' matches no .*closest: 'mlp\.c_fc'"):
        select(gpt2, ["mlp.*", "mlp.c_fcc"])
    with pytest.raises(ValueError, match=r"closest: .*'intermediate\.dense'"):
        select(bert, "intermediat.dense")
    with pytest.raises(ValueError, match=r"'!decoder\.\*' matches no"):
        select(gpt2, ["mlp.*", "!decoder.*"])


def test_the_output_embedding_is_left_out_unless_named_exactly():
    plain = Stack(blocks=2, tie=False)
    plain.get_output_embeddings = lambda: None
    assert "head" in names(select(plain, "*"))  # an untied head the model does not declare is a plain layer
    untied = Stack(blocks=2, tie=False)
    assert "head" not in names(select(untied, "*"))
    assert names(select(untied, "head")) == ["head"]
    with pytest.raises(ValueError, match="only the output embedding head"):
        select(untied, "he*")
    tied = Stack(blocks=2, tie=True)
    assert "head" not in names(select(tied, "*"))
    with pytest.raises(ValueError, match=r"head has parameters tied to the input embedding wte\.weight"):
        select(tied, "head")


def test_the_gpt2_lm_head_is_found_through_get_output_embeddings(gpt2):
    assert "lm_head" not in names(select(gpt2, "re:.*"))
    with pytest.raises(ValueError, match="tied to the input embedding transformer.wte.weight"):
        select(gpt2, "lm_head")


def test_shared_weights_are_never_split_and_shared_modules_are_one_target():
    net = Stack(blocks=2)
    net.h[1].proj.weight = net.h[0].proj.weight
    with pytest.raises(ValueError, match=r"h\.0\.proj has parameters shared with h\.1\.proj\.weight"):
        select(net, "proj")
    assert names(select(net, ["fc", "proj", "!proj"])) == ["h.0.fc", "h.1.fc"]
    shared = Stack(blocks=2)
    shared.h[1] = shared.h[0]  # one block under two names
    (target,) = select(shared, "h.1.fc")
    assert target.name == "h.0.fc" and target.aliases == ("h.1.fc",)


@pytest.mark.parametrize("rules, message", [
    ([], "rules is empty"),
    (["!mlp.*"], "only exclude"),
    ("re:(", "not a valid regular expression"),
    ("", "empty pattern"),
    ({"mlp.*": {"rnak": 2}}, r"unknown option\(s\) \['rnak'\]"),
    ({"!mlp.c_fc": {"rank": 2}}, "cannot carry options"),
    ({"mlp.*": 3}, "must be a dict"),
    ([3], "must be a string"),
    (3, "rules must be a pattern"),
])
def test_bad_rules(rules, message):
    with pytest.raises(ValueError, match=message):
        parse_rules(rules)


def test_a_model_without_linear_layers():
    with pytest.raises(ValueError, match="has no nn.Linear or Conv1D submodule"):
        select(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()), "*")
    with pytest.raises(ValueError, match="is itself one"):
        select(nn.Linear(2, 2), "*")

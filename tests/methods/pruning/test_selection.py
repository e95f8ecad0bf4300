"""The selection math on hand-made tensors: known scores give known kept tokens, known queries and
keys give known attention, and the cut plan, masks and gathers move exactly the entries they should.
Run alone as a debug script: `pytest tests/methods/pruning/test_selection.py -q`."""

import torch

from edgelmm.methods.pruning import DivPrune, FastV, RandomTokens, Selection, Uniform, VisionZip, VisualTokens
from edgelmm.methods.pruning.probes import last_query_attention, vision_attention
from edgelmm.methods.pruning.runtime import _cut_mask, _Decode, _gather_sequence, _plan, _weigh


def tokens(n, **scores):
    return VisualTokens(positions=torch.arange(10, 10 + n), hidden=torch.eye(n, 4), **scores)


def kept(pruner, visual):
    chosen = pruner.select(visual, pruner.n_keep(len(visual)))
    keep = chosen.keep if isinstance(chosen, Selection) else chosen
    return sorted(keep.tolist())


def test_fastv_keeps_the_most_attended_tokens():
    visual = tokens(6, lm_attention=torch.tensor([0.05, 0.30, 0.02, 0.25, 0.10, 0.28]))
    assert kept(FastV(keep=0.5), visual) == [1, 3, 5]
    assert kept(FastV(tokens=1), visual) == [1]


def test_keep_counts_round_half_up_and_never_reach_zero():
    assert [Uniform(keep=0.125).n_keep(n) for n in (144, 4, 3, 1)] == [18, 1, 1, 1]
    assert Uniform(keep=0.25).n_keep(6) == 2  # 1.5 rounds up
    assert Uniform(tokens=50).n_keep(16) == 16


def test_uniform_takes_the_middle_of_equal_stretches():
    assert kept(Uniform(keep=0.25), tokens(16)) == [2, 6, 10, 14]
    assert kept(Uniform(keep=1.0), tokens(5)) == [0, 1, 2, 3, 4]


def test_random_is_reproducible_by_seed_and_differs_between_requests():
    first, again = RandomTokens(keep=0.5, seed=3), RandomTokens(keep=0.5, seed=3)
    a, b = kept(first, tokens(32)), kept(first, tokens(32))
    assert a == kept(again, tokens(32)) and a != b and len(set(a)) == 16


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest_into_context_tokens():
    # 8 tokens: 0 and 5 dominate the vision attention; the rest form two feature clusters,
    # {1, 2, 3} along one axis and {4, 6, 7} along another.
    attention = torch.tensor([0.9, 0.1, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1])
    hidden = torch.tensor([[1.0, 1, 1]] + [[1, 0, 0]] * 3 + [[0, 1, 0]] + [[0, 0, 1]] + [[0, 1, 0]] * 2)
    visual = VisualTokens(positions=torch.arange(8), hidden=hidden, vision_attention=attention)
    selection = VisionZip(keep=0.5, context=0.5).select(visual, 4)
    assert selection.keep.tolist()[:2] in ([0, 5], [5, 0])
    targets = selection.keep[2:].tolist()  # evenly spaced among the rest [1, 2, 3, 4, 6, 7]: 2 and 6
    assert targets == [2, 6]
    groups = selection.merge_into.tolist()
    assert groups[0] == groups[5] == -1  # dominant tokens stay themselves
    assert groups[1] == groups[2] == groups[3] == 2 and groups[4] == groups[6] == groups[7] == 3


def test_last_query_attention_is_the_softmax_of_the_last_row_averaged_over_heads():
    # two query heads share one key head; keys 0..2, the last query sees all but padded key 0
    query = torch.zeros(1, 2, 3, 2)
    query[0, 0, -1] = torch.tensor([1.0, 0.0])
    query[0, 1, -1] = torch.tensor([0.0, 1.0])
    key = torch.tensor([[[[5.0, 5.0], [2.0, 0.0], [0.0, 2.0]]]])
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 0] = False
    scores = last_query_attention(query, key, mask, scaling=1.0)
    e = torch.exp(torch.tensor(2.0))
    expected = torch.tensor([0.0, (e / (e + 1) + 1 / (1 + e)) / 2, (1 / (e + 1) + e / (1 + e)) / 2])
    assert torch.allclose(scores[0], expected)
    additive = torch.zeros(1, 1, 3, 3).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.allclose(last_query_attention(query, key, additive, 1.0), scores)
    assert torch.allclose(last_query_attention(query, key, torch.tensor([[0, 1, 1]]), 1.0), scores)


def test_vision_attention_from_cls_or_from_all_queries():
    query = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]])
    key = torch.tensor([[[[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]]])
    cls = vision_attention(query, key, None, 1.0, cls_only=True)
    assert torch.allclose(cls, torch.softmax(torch.tensor([[0.0, 3.0, 0.0]]), -1))
    received = vision_attention(query, key, None, 1.0, cls_only=False, chunk=2)  # chunks add up
    rows = torch.softmax(torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0]]), -1)
    assert torch.allclose(received, rows.mean(0, keepdim=True))


def test_plan_cuts_rows_to_one_length_with_dead_slots_for_rows_that_drop_more():
    # row 0: pad, text, 2 visual, text; row 1: text, 4 visual, text -> row 0 drops 1, row 1 drops 2
    image = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    cut = _plan(image, [Selection(torch.tensor([1])), Selection(torch.tensor([3, 0]))])
    assert cut.keep.tolist() == [[0, 1, 3, 4, 5], [0, 1, 2, 4, 5]]
    assert cut.alive.tolist() == [[True] * 5, [True, True, False, True, True]]  # row 1's token 1 is dead
    assert cut.visual.tolist() == [[False, False, True, False, False], [False, True, True, True, False]]
    hidden = torch.arange(4.0)[:, None]
    assert cut.reduce_visual[1](hidden).flatten().tolist() == [0.0, 1.0, 3.0]


def test_merged_slots_become_the_mean_and_lone_tokens_stay_bit_identical():
    image = torch.ones(1, 4, dtype=torch.bool)
    rows = torch.tensor([[0.1], [1.0], [2.0], [4.0]])
    cut = _plan(image, [Selection(torch.tensor([3, 1]), merge_into=torch.tensor([-1, 1, 1, 0]))])
    assert cut.keep.tolist() == [[1, 3]]
    assert cut.reduce_visual[0](rows).flatten().tolist() == [1.5, 4.0]  # mean of tokens 1 and 2; token 3 alone


def test_gather_sequence_follows_each_rows_positions_in_every_layout():
    keep = torch.tensor([[0, 2], [1, 2]])
    positions = torch.arange(3)[None].expand(3, 2, 3) * torch.tensor([1, 10, 100])[:, None, None]
    assert _gather_sequence(positions, keep, -1).tolist() == [[[0, 2], [1, 2]], [[0, 20], [10, 20]], [[0, 200], [100, 200]]]
    cos = torch.arange(6.0).view(1, 3, 2)  # batch of 1, shared by both rows
    assert _gather_sequence(cos, keep, -2).tolist() == [[[0, 1], [4, 5]], [[2, 3], [4, 5]]]


def test_cut_mask_keeps_rows_and_columns_and_masks_dead_keys():
    image = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    cut = _plan(image, [Selection(torch.tensor([0, 2]))])
    assert _cut_mask(causal, cut, "sdpa").tolist() == [[[[True, False, False], [True, True, False], [True, True, True]]]]
    assert _cut_mask(None, cut, "sdpa") is None  # nothing dead: SDPA keeps its is_causal path
    two_rows = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    cut = _plan(two_rows, [Selection(torch.tensor([0])), Selection(torch.tensor([1]))])  # row 0 keeps a dead slot
    mask = _cut_mask(None, cut, "sdpa")
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    assert _cut_mask(None, cut, "flash_attention_2").tolist() == [[1, 1, 0], [1, 1, 1]]


def test_divprune_picks_one_token_per_cluster_first():
    # three tight clusters of unit vectors; 3 picks must hit each cluster once
    centres = torch.eye(3)
    points = torch.cat([centres[i] + 0.01 * torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    visual = VisualTokens(positions=torch.arange(12), hidden=points)
    keep = DivPrune(tokens=3).select(visual, 3).keep
    assert sorted((keep // 4).tolist()) == [0, 1, 2]
    merged = DivPrune(tokens=3, merge=True).select(visual, 3)
    assert (merged.keep[merged.merge_into] // 4).tolist() == (torch.arange(12) // 4).tolist()  # each to its own cluster


def test_proportional_attention_counts_a_merged_token_as_the_tokens_it_stands_for():
    # attention over [a, b, b, b] equals attention over [a, b] with log(3) added to b's logit
    q, k, v = torch.randn(3, 1, 1, 1, 4, generator=torch.Generator().manual_seed(0)).expand(3, 1, 1, 2, 4).unbind(0)
    k, v = k + torch.tensor([0.0, 1.0])[:, None], v * torch.tensor([1.0, -2.0])[:, None]  # two distinct tokens
    copies = torch.nn.functional.scaled_dot_product_attention(q[..., :1, :], k[:, :, [0, 1, 1, 1]], v[:, :, [0, 1, 1, 1]])
    bias = torch.tensor([1.0, 3.0]).log().view(1, 1, 1, 2)
    weighted = torch.nn.functional.scaled_dot_product_attention(q[..., :1, :], k, v, attn_mask=bias)
    assert torch.allclose(copies, weighted, atol=1e-6)
    # the plan gives the merged slot weight 3 and the prefill mask carries log(3) on that key
    image = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)
    cut = _plan(image, [Selection(torch.tensor([0, 1]), merge_into=torch.tensor([0, 1, 1, 1]))], proportional=True)
    assert cut.keep.tolist() == [[0, 1, 2]] and cut.weight.tolist() == [[1.0, 1.0, 3.0]]
    mask = _weigh(None, cut, torch.float32)[0, 0]
    assert torch.allclose(mask[2], torch.tensor([1.0, 1.0, 3.0]).log()) and mask[0, 1] == torch.finfo(torch.float32).min


def test_decode_steps_carry_the_merged_weights_in_a_4d_mask():
    # prompt cut to 3 slots (weights 1, 1, 3), 2 tokens generated, 2 new ones: causal among the new
    decode = _Decode(lambda: None, keep=torch.tensor([[0, 1, 2]]), alive=torch.ones(1, 3, dtype=torch.bool),
                     prompt_tokens=5, last_position=None, weight=torch.tensor([[1.0, 1.0, 3.0]]))
    kwargs = decode.step({"attention_mask": torch.ones(1, 5 + 2 + 2, dtype=torch.long)}, past=3 + 2, new=2)
    mask, low = kwargs["attention_mask"], torch.finfo(torch.float32).min
    assert mask.shape == (1, 1, 2, 7)
    log3 = torch.tensor(3.0).log().item()
    assert torch.allclose(mask[0, 0, 0], torch.tensor([0, 0, log3, 0, 0, 0, low]))
    assert torch.allclose(mask[0, 0, 1], torch.tensor([0, 0, log3, 0, 0, 0, 0.0]))

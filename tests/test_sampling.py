"""Unit tests for llmkit.sampling on small hand-made distributions whose answers are known."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from llmkit.errors import InvalidSamplingError
from llmkit.sampling import (
    SamplingParams,
    Sampler,
    StopMatcher,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    draw,
)

N_DRAWS = 20000


def logits_of(probs) -> torch.Tensor:
    """Logits whose softmax is `probs` (which sum to 1)."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).to(torch.float32)


def frequencies(params: SamplingParams, logits: torch.Tensor, n: int = N_DRAWS) -> np.ndarray:
    """Empirical frequencies of n draws (no penalties in play, so the state does not matter)."""
    sampler = Sampler(params, logits.shape[-1])
    counts = np.zeros(logits.shape[-1])
    for _ in range(n):
        counts[sampler.sample(logits, [])] += 1
    return counts / n


def assert_frequencies(freq: np.ndarray, expected, n: int = N_DRAWS) -> None:
    """Each frequency within 5 binomial standard errors of its expected probability; tokens with
    probability 0 must never appear."""
    expected = np.asarray(expected, dtype=np.float64)
    for token, (f, p) in enumerate(zip(freq, expected)):
        if p == 0:
            assert f == 0, f"token {token} has probability 0 but was drawn ({f})"
        else:
            se = math.sqrt(p * (1 - p) / n)
            assert abs(f - p) <= 5 * se + 1e-12, f"token {token}: {f} vs {p} (se {se:.4f})"


def probs_of(sampler: Sampler, logits: torch.Tensor, prompt=()) -> np.ndarray:
    return sampler.process(logits, list(prompt)).exp().double().numpy()


# --- greedy and temperature ----------------------------------------------------------------------


def test_greedy_picks_argmax_every_time():
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4, 0.0, 1.0, -3.0])
    sampler = Sampler(SamplingParams(temperature=0.0, seed=0), 7)
    assert [sampler.sample(logits, []) for _ in range(50)] == [1] * 50


def test_greedy_ignores_seed_and_filters():
    logits = torch.tensor([0.3, -0.2, 1.7, 1.6, 0.0])
    for seed in (0, 1, None):
        params = SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.2, seed=seed)
        assert Sampler(params, 5).sample(logits, []) == 2


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0, 0.0, 1.5])
    expected = np.exp(logits.double().numpy() / temperature)
    expected /= expected.sum()
    freq = frequencies(SamplingParams(temperature=temperature, seed=1234), logits)
    assert_frequencies(freq, expected)
    # process() reports the same distribution the draws come from.
    sampler = Sampler(SamplingParams(temperature=temperature, seed=0), 6)
    np.testing.assert_allclose(probs_of(sampler, logits), expected, rtol=1e-5, atol=1e-7)


def test_input_logits_are_not_modified():
    logits = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0])
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7, top_k=3, top_p=0.9, min_p=0.1, repetition_penalty=1.3,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={1: 2.0}, seed=0,
    )
    sampler = Sampler(params, 5)
    sampler.sample(logits, [0, 3])
    sampler.process(logits, [0, 3])
    assert torch.equal(logits, before)


# --- top-k ---------------------------------------------------------------------------------------


def test_top_k_only_yields_the_k_largest():
    logits = torch.tensor([0.5, 1.0, 3.0, -1.0, 2.9, 0.0, 1.5])
    freq = frequencies(SamplingParams(top_k=2, seed=7), logits, n=5000)
    assert set(np.nonzero(freq)[0]) == {2, 4}
    p2, p4 = math.exp(3.0), math.exp(2.9)
    expected = [0, 0, p2 / (p2 + p4), 0, p4 / (p2 + p4), 0, 0]
    sampler = Sampler(SamplingParams(top_k=2), 7)
    np.testing.assert_allclose(probs_of(sampler, logits), expected, atol=1e-6)
    assert_frequencies(freq, expected, n=5000)


def test_top_k_at_or_above_vocab_size_is_a_no_op():
    logits = torch.tensor([0.5, 1.0, 3.0])
    assert torch.equal(apply_top_k(logits, 3), logits)
    assert torch.equal(apply_top_k(logits, 10), logits)
    assert torch.equal(apply_top_k(logits, 0), logits)


# --- top-p ---------------------------------------------------------------------------------------

# Probabilities by token: sorted, they are 0.4, 0.3, 0.2, 0.1 (cumulative 0.4, 0.7, 0.9, 1.0).
TOP_P_PROBS = [0.2, 0.4, 0.1, 0.3]


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (1.0, {0, 1, 2, 3}),
        (0.95, {0, 1, 2, 3}),
        (0.9, {0, 1, 3}),  # boundary: 0.4 + 0.3 + 0.2 == 0.9 exactly, so 0.1 is not needed
        (0.71, {0, 1, 3}),
        (0.7, {1, 3}),  # boundary: 0.4 + 0.3 == 0.7
        (0.5, {1, 3}),
        (0.4, {1}),  # boundary: the top token alone reaches 0.4
        (0.39, {1}),
        (1e-9, {1}),  # always at least one token
    ],
)
def test_top_p_keeps_the_expected_nucleus_and_renormalises(top_p, kept):
    logits = logits_of(TOP_P_PROBS)
    mass = sum(TOP_P_PROBS[t] for t in kept)
    expected = [TOP_P_PROBS[t] / mass if t in kept else 0.0 for t in range(4)]
    sampler = Sampler(SamplingParams(top_p=top_p), 4)
    probs = probs_of(sampler, logits)
    assert set(np.nonzero(probs)[0]) == kept
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_top_p_draws_follow_the_renormalised_nucleus():
    logits = logits_of(TOP_P_PROBS)
    freq = frequencies(SamplingParams(top_p=0.7, seed=99), logits)
    assert_frequencies(freq, [0, 4 / 7, 0, 3 / 7])


def test_top_p_applies_after_temperature():
    # At T=0.5 the distribution sharpens to 16:9:4:1 (squares), sorted 16/30, 9/30, ...: a top_p
    # of 0.6 then needs only the first two tokens, and 0.5 just the first.
    logits = logits_of(TOP_P_PROBS)
    sampler = Sampler(SamplingParams(temperature=0.5, top_p=0.5), 4)
    np.testing.assert_allclose(probs_of(sampler, logits), [0, 1, 0, 0], atol=1e-6)
    sampler = Sampler(SamplingParams(temperature=0.5, top_p=0.6), 4)
    np.testing.assert_allclose(probs_of(sampler, logits), [0, 16 / 25, 0, 9 / 25], atol=1e-6)


def test_top_p_after_top_k_uses_the_renormalised_distribution():
    # top_k=2 leaves 0.4 and 0.3, renormalised 4/7 and 3/7; top_p=0.5 then keeps only the first.
    logits = logits_of(TOP_P_PROBS)
    sampler = Sampler(SamplingParams(top_k=2, top_p=0.5), 4)
    np.testing.assert_allclose(probs_of(sampler, logits), [0, 1, 0, 0], atol=1e-6)


def test_top_p_matches_transformers_away_from_the_boundary():
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1, 50, generator=gen) * 2
        top_p = float(torch.rand(1, generator=gen)) * 0.9 + 0.05
        ours = torch.isinf(apply_top_p(logits, top_p))
        theirs = torch.isinf(TopPLogitsWarper(top_p)(None, logits.clone()))
        assert torch.equal(ours, theirs), transformers.__version__


def reference_top_p_kept(probs: np.ndarray, top_p: float) -> set[int]:
    """The nucleus by the definition, with a full sort in float64."""
    order = np.argsort(-probs, kind="stable")
    kept, mass = set(), 0.0
    for token in order:
        kept.add(int(token))
        mass += probs[token]
        if mass >= top_p - 1e-6:
            break
    return kept


@pytest.mark.parametrize("vocab", [300, 5000, 49152])
@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])  # flat to peaky: the nucleus is huge to tiny
def test_top_p_on_large_vocabularies_matches_the_definition(vocab, scale):
    gen = torch.Generator().manual_seed(vocab + int(scale * 10))
    logits = torch.randn(vocab, generator=gen) * scale
    # The float32 softmax is the distribution being cut; its own rounding (~1e-6 in total) moves
    # a cut deep in a 49k tail by a few tokens against a float64 softmax, so compare against it.
    probs = torch.softmax(logits, -1).double().numpy()
    for top_p in (0.3, 0.9, 0.999):
        kept = set(torch.isfinite(apply_top_p(logits, top_p)).nonzero().flatten().tolist())
        assert kept == reference_top_p_kept(probs, top_p)


def test_top_k_fast_path_agrees_with_the_plain_filters():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(1000, generator=gen) * 2
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.8, min_p=0.05)
    fast = Sampler(params, 1000).filter(logits)
    plain = apply_min_p(apply_top_p(apply_top_k(logits / 0.8, 40), 0.8), 0.05)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(plain))
    torch.testing.assert_close(torch.log_softmax(fast, -1), torch.log_softmax(plain, -1))


def test_top_k_keeps_ties_with_the_kth_token():
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])
    sampler = Sampler(SamplingParams(top_k=2), 5)
    assert torch.isfinite(sampler.process(logits, [])).tolist() == [True, False, True, True, False]


# --- min-p ---------------------------------------------------------------------------------------

# Sorted: 0.5, 0.25, 0.15, 0.1.
MIN_P_PROBS = [0.15, 0.5, 0.1, 0.25]


@pytest.mark.parametrize(
    "min_p, kept",
    [
        (0.0, {0, 1, 2, 3}),
        (0.19, {0, 1, 2, 3}),  # threshold 0.095
        (0.25, {0, 1, 3}),  # threshold 0.125
        (0.4, {1, 3}),  # threshold 0.2
        (0.6, {1}),  # threshold 0.3
        (1.0, {1}),
    ],
)
def test_min_p_drops_exactly_the_expected_tokens(min_p, kept):
    logits = logits_of(MIN_P_PROBS)
    mass = sum(MIN_P_PROBS[t] for t in kept)
    expected = [MIN_P_PROBS[t] / mass if t in kept else 0.0 for t in range(4)]
    sampler = Sampler(SamplingParams(min_p=min_p), 4)
    np.testing.assert_allclose(probs_of(sampler, logits), expected, atol=1e-6)


def test_min_p_draws():
    freq = frequencies(SamplingParams(min_p=0.4, seed=5), logits_of(MIN_P_PROBS))
    assert_frequencies(freq, [0, 2 / 3, 0, 1 / 3])


def test_filters_work_on_batches_row_by_row():
    gen = torch.Generator().manual_seed(3)
    batch = torch.randn(4, 32, generator=gen)
    for fn, arg in ((apply_top_k, 5), (apply_top_p, 0.8), (apply_min_p, 0.1)):
        together = fn(batch, arg)
        for row in range(4):
            assert torch.equal(together[row], fn(batch[row], arg))


def test_draw_never_returns_a_zero_probability_token_and_handles_batches():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    assert {int(draw(probs, gen)) for _ in range(2000)} == {1, 3}
    batch = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert draw(batch, gen).tolist() == [2, 0]
    # Unnormalised rows are fine.
    assert {int(draw(torch.tensor([0.0, 7.0]), gen)) for _ in range(100)} == {1}


# --- penalties and bias --------------------------------------------------------------------------


def test_repetition_penalty_matches_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.5, 1.0, 0.0])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), 6)
    sampler.accept(2)  # generated tokens count as well as the prompt
    # Seen: 0, 1 (prompt) and 2 (generated). Positive logits halve, negative double.
    hand = torch.tensor([1.0, -2.0, 0.25, -0.5, 1.0, 0.0])
    torch.testing.assert_close(sampler.process(logits, [0, 1, 1]), torch.log_softmax(hand, -1))


def test_a_tiny_repetition_penalty_keeps_probabilities_finite():
    """A penalty of 1e-45 (a subnormal float) divides positive logits into infinity: two of them
    once made NaN probabilities, and a token outside a JSON grammar was sampled (a 500)."""
    logits = torch.tensor([2.0, 3.0, -1.0, 0.5])
    for temperature in (0.0, 1.0):
        sampler = Sampler(SamplingParams(temperature=temperature, repetition_penalty=1.4e-45), 4)
        out = sampler.process(logits, [0, 1, 2])
        assert not torch.isnan(out).any()
        assert int(out.argmax()) in (0, 1)


def test_repetition_penalty_follows_a_changed_prompt():
    logits = torch.tensor([2.0, 2.0, 0.0])
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=4.0), 3)
    prompt = [0]
    assert sampler.process(logits, prompt)[0] < sampler.process(logits, prompt)[1]
    assert sampler.process(logits, [1])[0] > sampler.process(logits, [1])[1]
    assert sampler.process(logits, torch.tensor([0]))[0] < sampler.process(logits, [1])[0]


def test_repetition_penalty_below_one_encourages_repeats():
    logits = torch.tensor([2.0, -1.0, 0.5])
    sampler = Sampler(SamplingParams(repetition_penalty=0.5), 3)
    hand = torch.tensor([4.0, -0.5, 0.5])
    torch.testing.assert_close(sampler.process(logits, [0, 1]), torch.log_softmax(hand, -1))


def test_repetition_penalty_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, generator=gen) * 3
    prompt = [3, 7, 7, 11, 39]
    sampler = Sampler(SamplingParams(repetition_penalty=1.3), 40)
    for token in (5, 3, 20):
        sampler.accept(token)
    ids = torch.tensor([prompt + [5, 3, 20]])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()[None])[0]
    torch.testing.assert_close(sampler.penalize(logits, prompt), theirs)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler(params, 5)
    for token in (1, 1, 1, 3):
        sampler.accept(token)
    # counts: token 1 x3, token 3 x1; the prompt (token 0, 4) does not count.
    hand = logits - torch.tensor([0.0, 0.5 + 3 * 0.25, 0.0, 0.5 + 0.25, 0.0])
    torch.testing.assert_close(sampler.process(logits, [0, 4, 4]), torch.log_softmax(hand, -1))


def test_negative_presence_penalty_encourages_and_sample_records_its_token():
    logits = torch.tensor([1.0, 1.0, 1.0])
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=-1.0), 3)
    first = sampler.sample(logits, [])
    assert sampler.counts.tolist()[first] == 1 and sampler.generated == [first]
    # The token just drawn is now favoured by 1.0 and wins every time after.
    assert [sampler.sample(logits, []) for _ in range(5)] == [first] * 5
    assert sampler.counts.tolist()[first] == 6


def test_frequency_penalty_steers_greedy_away_from_repeats():
    logits = torch.tensor([1.0, 0.9, 0.0])
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=0.2), 3)
    # 1.0 vs 0.9: token 0 once (0.8 < 0.9), then token 1 (0.7 < 0.8), then token 0 again.
    assert [sampler.sample(logits, []) for _ in range(4)] == [0, 1, 0, 1]


def test_logit_bias_can_force_and_ban_tokens():
    logits = torch.tensor([3.0, 1.0, 0.0, -2.0, 0.5])
    forced = Sampler(SamplingParams(logit_bias={3: 100.0}, seed=0), 5)
    assert {forced.sample(logits, []) for _ in range(200)} == {3}
    banned = Sampler(SamplingParams(temperature=0, logit_bias={0: -100.0}), 5)
    assert banned.sample(logits, []) == 1
    hand = logits + torch.tensor([0.0, 0.0, 0.0, 100.0, 0.0])
    torch.testing.assert_close(forced.process(logits, []), torch.log_softmax(hand, -1))


def test_logit_bias_accepts_json_string_keys():
    assert SamplingParams(logit_bias={"4": -5}).logit_bias == {4: -5}


def test_logit_bias_out_of_vocabulary_is_rejected():
    with pytest.raises(InvalidSamplingError, match="logit_bias"):
        Sampler(SamplingParams(logit_bias={10: 1.0}), 5)


def test_transform_order_bias_then_repetition_then_presence():
    # Token 0: bias first (-1 + 4 = 3), then the repetition penalty (3 / 2 = 1.5), then presence
    # (1.5 - 0.5 = 1.0). Any other order gives a different number.
    logits = torch.tensor([-1.0, 0.0, 0.0])
    params = SamplingParams(logit_bias={0: 4.0}, repetition_penalty=2.0, presence_penalty=0.5)
    sampler = Sampler(params, 3)
    sampler.accept(0)
    torch.testing.assert_close(sampler.penalize(logits, []), torch.tensor([1.0, 0.0, 0.0]))


def test_wrong_vocab_size_is_rejected():
    sampler = Sampler(SamplingParams(), 5)
    with pytest.raises(InvalidSamplingError, match="vocabulary"):
        sampler.sample(torch.zeros(6), [])
    with pytest.raises(InvalidSamplingError):
        sampler.accept(5)


# --- seeds ---------------------------------------------------------------------------------------


def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.zeros(10)

    def run(seed):
        sampler = Sampler(SamplingParams(seed=seed), 10)
        return [sampler.sample(logits, []) for _ in range(200)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_seed_none_draws_a_fresh_seed_that_replays():
    logits = torch.zeros(10)
    a, b = Sampler(SamplingParams(), 10), Sampler(SamplingParams(), 10)
    assert a.seed != b.seed
    draws = [a.sample(logits, []) for _ in range(100)]
    replay = Sampler(SamplingParams(seed=a.seed), 10)
    assert [replay.sample(logits, []) for _ in range(100)] == draws


def test_samplers_do_not_share_random_state():
    logits = torch.zeros(10)
    alone = Sampler(SamplingParams(seed=5), 10)
    expected = [alone.sample(logits, []) for _ in range(50)]
    a, other = Sampler(SamplingParams(seed=5), 10), Sampler(SamplingParams(seed=6), 10)
    got = []
    for _ in range(50):
        got.append(a.sample(logits, []))
        other.sample(logits, [])
        torch.rand(3)  # the global generator must not matter either
    assert got == expected


# --- SamplingParams ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("seed", 1.5),
        ("stop", [""]),
        ("stop", ""),
        ("stop", [f"s{i}" for i in range(17)]),
        ("stop", [1]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["x"]),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {1: float("nan")}),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(InvalidSamplingError, match=field) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidSamplingError, match=field):
        SamplingParams().replace(**{field: value})


def test_error_message_names_value_and_range():
    with pytest.raises(InvalidSamplingError) as info:
        SamplingParams(top_p=1.5)
    message = str(info.value)
    assert "top_p" in message and "1.5" in message and "(0, 1]" in message


def test_boundary_values_are_valid():
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, max_tokens=1, top_k=0)
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.01)
    SamplingParams(stop=[f"s{i}" for i in range(16)])


def test_defaults_and_stop_normalisation():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (256, 1.0, 0, 1.0, 0.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None and p.seed is None
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    # Defaults are not shared between instances.
    q = SamplingParams()
    q.stop.append("x")
    assert SamplingParams().stop == []


def test_replace_returns_a_validated_copy():
    p = SamplingParams(temperature=0.5)
    q = p.replace(top_k=5)
    assert (q.temperature, q.top_k, p.top_k) == (0.5, 5, 0)


# --- StopMatcher ---------------------------------------------------------------------------------


def run_matcher(stops, pieces):
    """Everything emitted, concatenated, and whether a stop was hit."""
    matcher = StopMatcher(stops)
    out, hit = [], False
    for piece in pieces:
        emitted, hit = matcher.feed(piece)
        out.append(emitted)
        if hit:
            break
    if not hit:
        out.append(matcher.flush())
    return "".join(out), hit


def expected_cut(text, stops):
    found = [i for i in (text.find(s) for s in stops) if i != -1]
    return (text[: min(found)], True) if found else (text, False)


def test_stop_inside_one_piece():
    assert run_matcher(["STOP"], ["Hello STOP world"]) == ("Hello ", True)


def test_stop_spanning_pieces_and_nothing_after_it():
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("answer <") == ("answer ", False)
    assert matcher.feed("/") == ("", False)
    assert matcher.feed("s> tail") == ("", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""
    assert matcher.matched == "</s>"


def test_partial_match_that_is_not_a_stop_comes_out_unchanged_and_promptly():
    matcher = StopMatcher(["abc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.pending == "ab"
    assert matcher.feed("d") == ("abd", False)  # released as soon as it cannot be a stop
    assert matcher.feed("ab") == ("", False)
    assert matcher.flush() == "ab"  # held text comes back at the end


def test_several_stops_earliest_wins():
    assert run_matcher(["world", "lo"], ["hello world"]) == ("hel", True)
    assert run_matcher(["world", "lo"], ["hel", "l", "o wor", "ld"]) == ("hel", True)


def test_overlapping_prefixes():
    stops = ["abc", "bcd"]
    assert run_matcher(stops, ["xa", "b", "cd"]) == ("x", True)  # "abc" starts first
    assert run_matcher(stops, ["xb", "c", "d"]) == ("x", True)
    assert run_matcher(stops, ["ab", "ce"]) == ("", True)
    assert run_matcher(stops, ["ab", "x"]) == ("abx", False)
    # "ab" is held for "abd"; then "bc" is found inside it.
    assert run_matcher(["abd", "bc"], ["ab", "cd"]) == ("a", True)


def test_unicode_stop_strings():
    stops = ["ünd", "🙂🙃", "終わり"]
    assert run_matcher(stops, ["Grüße ü", "nd mehr"]) == ("Grüße ", True)
    assert run_matcher(stops, ["ok 🙂", "🙂", "🙃!"]) == ("ok 🙂", True)
    assert run_matcher(stops, ["これで終", "わり です"]) == ("これで", True)
    assert run_matcher(stops, ["これで終", "了"]) == ("これで終了", False)


def test_no_stops_passes_everything_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_stop_matcher_rejects_empty_stop():
    with pytest.raises(InvalidSamplingError):
        StopMatcher(["ok", ""])


@pytest.mark.parametrize(
    "text, stops",
    [
        ("the quick brown fox jumps over the lazy dog", ["lazy", "over the", "fox jumps!"]),
        ("aaaaaaaaab aab abab", ["aab", "abab"]),
        ("abcabcabd abcd", ["abcd", "bcab", "cabd"]),
        ("no stop in here at all, just a few s-t-o-p look-alikes: sto st s", ["stop", "</s>"]),
        ("Grüße aus Zürich 🙂🙃 終わり end", ["🙃 終", "Zür", "ürich"]),
        ("<|im_end|><|im_start|>", ["<|im_end|>"]),
        ("xxxxxxxx", ["xxy"]),
    ],
)
def test_any_splitting_emits_the_text_cut_at_the_first_stop(text, stops):
    expected = expected_cut(text, stops)
    rng = random.Random(f"{text}|{stops}")
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        if rng.random() < 0.2:
            pieces.insert(rng.randrange(len(pieces) + 1), "")  # empty pieces happen too
        assert run_matcher(stops, pieces) == expected, pieces

        # Text is held back only while it could still start a stop.
        matcher, consumed, emitted = StopMatcher(stops), "", ""
        for piece in pieces:
            out, hit = matcher.feed(piece)
            consumed += piece
            emitted += out
            if hit:
                break
            held = matcher.pending
            assert emitted + held == consumed
            longest = max(
                (k for k in range(1, len(consumed) + 1)
                 if any(s.startswith(consumed[-k:]) for s in stops)),
                default=0,
            )
            assert len(held) == longest


def test_logit_bias_keys_must_be_ascii_decimal_token_ids():
    assert SamplingParams(logit_bias={"12": 1.0, "-0": 0.5}).logit_bias == {12: 1.0, 0: 0.5}
    for key in ("\u00b2", "\u0663", "1e3", ""):  # superscript two and Arabic-Indic three pass str.isdigit()
        with pytest.raises(InvalidSamplingError, match="logit_bias"):
            SamplingParams(logit_bias={key: 1.0})


def test_seeds_must_fit_in_64_bits():
    SamplingParams(seed=2**64 - 1)
    SamplingParams(seed=-(2**63))
    for seed in (2**64, -(2**63) - 1, 10**30):
        with pytest.raises(InvalidSamplingError, match="seed"):
            SamplingParams(seed=seed)

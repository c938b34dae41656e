"""EngineCore: continuous batching must not change results.

Greedy outputs of requests that share decode steps (joining and leaving at different steps) must
equal the outputs of the same requests run one at a time, and those must equal transformers'
``generate``. Exact token equality: the tiny models use large init so logits are well separated.
"""
import pytest
import torch

from llmquant.serving.core import EngineCore, Request
from llmquant.serving.sampling import SamplingParams

from .helpers import make_tiny_gemma3, make_tiny_llama

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog because",
    "a",
    "Once upon a time, in a land far away, there lived",
    "1 2 3 4 5",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def run(core: EngineCore, prompts, params, join_after=None):
    """Run ``prompts`` on ``core``; request i joins after ``join_after[i]`` steps (all at 0 by default)."""
    join_after = join_after or [0] * len(prompts)
    per_request = params if isinstance(params, list) else [params] * len(prompts)
    reqs = [Request(p, pr, lambda ev: None) for p, pr in zip(prompts, per_request)]
    events = {r.id: [] for r in reqs}
    for r in reqs:
        r.sink = events[r.id].append
    steps = 0
    while True:
        for r, at in zip(reqs, join_after):
            if at == steps:
                core.add(r)
        if not core.has_work() and steps > max(join_after):
            break
        core.step()
        steps += 1
    return reqs, events


def sequential(model, tok, prompts, params):
    outs = []
    for p in prompts:
        core = EngineCore(model, tok, max_batch=1)
        reqs, _ = run(core, [p], params)
        outs.append(reqs[0].output_ids)
    return outs


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def plain_llama(tokenizer):
    return make_tiny_llama(len(tokenizer), seed=1)  # no eos in its config: generate() runs to max_new_tokens


def hf_generate(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_single_request_matches_hf_generate(plain_llama, tokenizer, prompt_ids):
    ref = [hf_generate(plain_llama, p, GREEDY.max_tokens) for p in prompt_ids]
    assert sequential(plain_llama, tokenizer, prompt_ids, GREEDY) == ref


@pytest.mark.parametrize("join_after", [None, [0, 3, 3, 7, 11]], ids=["together", "staggered"])
def test_batched_greedy_equals_one_at_a_time(plain_llama, tokenizer, prompt_ids, join_after):
    ref = sequential(plain_llama, tokenizer, prompt_ids, GREEDY)
    core = EngineCore(plain_llama, tokenizer, max_batch=8)
    # different max_tokens make requests leave at different steps while others keep running
    params = [SamplingParams(max_tokens=12 - 2 * (i % 3), temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    reqs, events = run(core, prompt_ids, params, join_after)
    for r, want, p in zip(reqs, ref, params):
        assert r.output_ids == want[: p.max_tokens]
        assert r.finish_reason == "length"
        evs = events[r.id]
        assert [t for ev in evs for t in ev.token_ids] == r.output_ids
        assert evs[-1].finish_reason == "length" and all(ev.finish_reason is None for ev in evs[:-1])
        assert evs[-1].completion_tokens == p.max_tokens and evs[-1].prompt_tokens == len(r.prompt_ids)
    if join_after is None:
        assert core.decode_steps == max(p.max_tokens for p in params) - 1  # shared steps, not a sum
        assert core.prefills == 1  # all five prompts, left-padded, in one forward
    else:
        assert core.prefills == len(set(join_after))
    assert core.batch.size == 0 and core.batch.cache is None and not core.running


def test_prefill_token_budget_splits_groups(plain_llama, tokenizer, prompt_ids):
    ref = sequential(plain_llama, tokenizer, prompt_ids, GREEDY)
    longest = max(len(p) for p in prompt_ids)
    core = EngineCore(plain_llama, tokenizer, max_batch=8, max_prefill_tokens=2 * longest)
    reqs, _ = run(core, prompt_ids, GREEDY)
    assert [r.output_ids for r in reqs] == ref
    assert 2 < core.prefills < len(prompt_ids)  # at most two padded prompts per forward, so several groups


def test_max_batch_limits_rows_and_queues_the_rest(plain_llama, tokenizer, prompt_ids):
    core = EngineCore(plain_llama, tokenizer, max_batch=2)
    for p in prompt_ids:
        core.add(Request(p, GREEDY, lambda ev: None))
    core.step()
    assert len(core.running) == 2 and core.batch.size == 2 and len(core.waiting) == len(prompt_ids) - 2


def test_sliding_window_model_batched_equals_generate(tokenizer, prompt_ids):
    # Gemma-3 with a 6-token window: the engine keeps full history and masks; generate() uses
    # transformers' own sliding-window cache. Both must agree, alone and batched.
    model = make_tiny_gemma3(len(tokenizer))
    ref = [hf_generate(model, p, GREEDY.max_tokens) for p in prompt_ids]
    assert sequential(model, tokenizer, prompt_ids, GREEDY) == ref
    reqs, _ = run(EngineCore(model, tokenizer, max_batch=8), prompt_ids, GREEDY, [0, 2, 2, 5, 9])
    assert [r.output_ids for r in reqs] == ref


def test_quantized_model_batched_equals_one_at_a_time(tokenizer, prompt_ids):
    from llmquant import QuantConfig, QuantLinear, quantize

    model = make_tiny_llama(len(tokenizer), seed=2)
    quantize(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    ref = sequential(model, tokenizer, prompt_ids, GREEDY)
    reqs, _ = run(EngineCore(model, tokenizer, max_batch=8), prompt_ids, GREEDY, [0, 1, 1, 4, 4])
    assert [r.output_ids for r in reqs] == ref


def test_seeds_reproducible_and_independent_of_the_batch(plain_llama, tokenizer, prompt_ids):
    def sampled(seed):
        return SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True)

    alone = sequential(plain_llama, tokenizer, [prompt_ids[1]], sampled(123))[0]
    again = sequential(plain_llama, tokenizer, [prompt_ids[1]], sampled(123))[0]
    assert alone == again
    # the same request with the same seed, now sharing steps with others that sample too
    params = [sampled(7), sampled(123), sampled(8)]
    reqs, _ = run(EngineCore(plain_llama, tokenizer, max_batch=8), prompt_ids[:3], params, [0, 2, 0])
    assert reqs[1].output_ids == alone
    other = sequential(plain_llama, tokenizer, [prompt_ids[1]], sampled(124))[0]
    assert other != alone


def test_tiny_top_p_is_greedy(plain_llama, tokenizer, prompt_ids):
    ref = sequential(plain_llama, tokenizer, prompt_ids[:2], GREEDY)
    nucleus = SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=0, ignore_eos=True)
    assert sequential(plain_llama, tokenizer, prompt_ids[:2], nucleus) == ref


def test_stop_string_truncates_text(plain_llama, tokenizer, prompt_ids):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    reqs, events = run(EngineCore(plain_llama, tokenizer), [prompt_ids[0]], params)
    full = "".join(ev.text for ev in events[reqs[0].id])
    assert full == tokenizer.decode(reqs[0].output_ids, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    stopped = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=("\x00never", stop))
    reqs, events = run(EngineCore(plain_llama, tokenizer), [prompt_ids[0]], stopped)
    text = "".join(ev.text for ev in events[reqs[0].id])
    assert text == full[: full.index(stop)]
    assert reqs[0].finish_reason == "stop" and len(reqs[0].output_ids) < 30


def test_eos_ends_with_stop(llama, tokenizer, prompt_ids):
    # make the first generated token the EOS id: stop, and its text (special token) is not returned
    first = sequential(llama, tokenizer, [prompt_ids[0]], GREEDY)[0][0]
    core = EngineCore(llama, tokenizer, eos_ids={first})
    reqs, events = run(core, [prompt_ids[0]], SamplingParams(max_tokens=5, temperature=0))
    assert reqs[0].output_ids == [first] and reqs[0].finish_reason == "stop"
    assert events[reqs[0].id][-1].text == "" and events[reqs[0].id][-1].completion_tokens == 1


def test_cancel_frees_the_row_and_others_continue(plain_llama, tokenizer, prompt_ids):
    ref = sequential(plain_llama, tokenizer, prompt_ids[:3], GREEDY)
    core = EngineCore(plain_llama, tokenizer, max_batch=8)
    reqs = [Request(p, GREEDY, lambda ev: None) for p in prompt_ids[:3]]
    events = {r.id: [] for r in reqs}
    for r in reqs:
        r.sink = events[r.id].append
        core.add(r)
    core.step()
    core.step()
    assert core.batch.size == 3
    reqs[1].cancel()
    core.step()
    assert core.batch.size == 2 and reqs[1] not in core.running
    assert events[reqs[1].id][-1].finish_reason == "abort" and len(reqs[1].output_ids) == 3  # prefill + 2 decodes
    while core.has_work():
        core.step()
    assert [reqs[0].output_ids, reqs[2].output_ids] == [ref[0], ref[2]]
    assert core.batch.size == 0


def test_check_names_sizes(plain_llama, tokenizer):
    core = EngineCore(plain_llama, tokenizer, max_model_len=32)
    with pytest.raises(ValueError, match="prompt has 40 tokens; the context length is 32"):
        core.check([1] * 40, GREEDY)
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_tokens \(12\) = 42 exceeds the context "
                                         r"length 32"):
        core.check([1] * 30, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        core.check([], GREEDY)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 49152\)"):
        core.check([1, 49152], GREEDY)


def test_sampling_params_validation():
    for bad in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"seed": 2**64},
                {"stop": ("",)}, {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_mixed_precision_checkpoint_serves_like_generate(tokenizer, prompt_ids, tmp_path):
    """A checkpoint whose layers' schemes were chosen under a bit budget loads the way ``llmquant serve``
    loads it and decodes, batched, the tokens transformers' ``generate`` gives on the same model."""
    from llmquant import QuantConfig, QuantLinear, quantize, save_quantized
    from llmquant.models import load_model

    model = make_tiny_llama(len(tokenizer), seed=3)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, len(tokenizer), (1, 32), generator=g) for _ in range(6)]
    quantize(model, QuantConfig(method="gptq", target_bpw=3.5, mixed_group_sizes=(32, 64)), calibration=calibration,
             progress=False)
    save_quantized(model, tmp_path / "mixed", tokenizer)
    served, tok = load_model(str(tmp_path / "mixed"))
    schemes = {(m.bits, m.group_size, m.sym) for m in served.modules() if isinstance(m, QuantLinear)}
    assert len(schemes) > 1, schemes
    ref = [hf_generate(served, ids, GREEDY.max_tokens) for ids in prompt_ids]
    reqs, _ = run(EngineCore(served, tok, max_batch=8), prompt_ids, GREEDY, [0, 1, 1, 4, 4])
    assert [r.output_ids for r in reqs] == ref


def test_quantized_embedding_checkpoint_serves_like_generate(tokenizer, prompt_ids, tmp_path):
    """Gemma 3 with its tied embedding/head table quantized once (QuantEmbedding + TiedQuantHead) loads the way
    ``llmquant serve`` loads it, decodes batched what ``generate`` gives, and refuses an out-of-vocabulary id."""
    from llmquant import QuantConfig, quantize, save_quantized
    from llmquant.models import load_model
    from llmquant.modules.quant_embedding import QuantEmbedding, TiedQuantHead

    model = make_tiny_gemma3(len(tokenizer), seed=4)
    quantize(model, QuantConfig(bits=4, group_size=32, quantize_lm_head=True, quantize_embedding=True), progress=False)
    save_quantized(model, tmp_path / "q", tokenizer)
    served, tok = load_model(str(tmp_path / "q"))
    assert isinstance(served.get_input_embeddings(), QuantEmbedding) and isinstance(served.lm_head, TiedQuantHead)
    ref = [hf_generate(served, ids, GREEDY.max_tokens) for ids in prompt_ids]
    core = EngineCore(served, tok, max_batch=8)
    reqs, _ = run(core, prompt_ids, GREEDY, [0, 1, 1, 4, 4])
    assert [r.output_ids for r in reqs] == ref
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {len(tokenizer)}\)"):
        core.check([1, len(tokenizer)], GREEDY)

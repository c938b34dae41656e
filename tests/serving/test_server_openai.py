"""The real ``openai`` client against the real server (uvicorn on 127.0.0.1) over a tiny random Llama
with SmolLM2's tokenizer. Expected texts come from running the same prompts through EngineCore alone."""
import concurrent.futures
import threading
import time

import openai
import pytest

from llmquant.serving.core import EngineCore, Request
from llmquant.serving.sampling import SamplingParams

from .helpers import make_tiny_llama, serving

PROMPTS = ["Hello there", "The quick brown fox", "a", "Once upon a time", "1 2 3", "Dear Sir,", "import numpy", "Q:"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_llama(len(tokenizer), seed=3, max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def server(model, chat_tokenizer):
    with serving(model, chat_tokenizer, max_batch=4, max_queue=16) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_text(model, tokenizer, ids, max_tokens):
    """(text, finish_reason, n_tokens) of a greedy run on EngineCore alone (no server, no batching)."""
    core = EngineCore(model, tokenizer, max_batch=1)
    events = []
    req = Request(ids, SamplingParams(max_tokens=max_tokens, temperature=0), events.append)
    core.add(req)
    while core.has_work():
        core.step()
    return "".join(e.text for e in events), req.finish_reason, len(req.output_ids)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion(client, model, tokenizer):
    want, finish, n = greedy_text(model, tokenizer, tokenizer.encode(PROMPTS[1]), 20)
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == want and r.choices[0].finish_reason == finish == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[1]))
    assert r.usage.completion_tokens == n == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20


def test_completion_token_prompt_and_default_max_tokens(client, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])
    r = client.completions.create(model="tiny", prompt=ids, temperature=0)
    assert r.usage.completion_tokens == 16  # OpenAI's default for /v1/completions
    same = client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0)
    assert r.choices[0].text == same.choices[0].text


def test_completion_streaming(client, model, tokenizer):
    want, _, _ = greedy_text(model, tokenizer, tokenizer.encode(PROMPTS[3]), 24)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert len(finishes) > 2  # really streamed, not one blob
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # as OpenAI's: with include_usage every other chunk carries "usage": null
    assert all(c.usage is None and "usage" in c.model_fields_set for c in chunks[:-1])


def test_chat(client, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    want, finish, n = greedy_text(model, tokenizer, list(ids), 15)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason == finish and r.usage.completion_tokens == n
    assert r.usage.prompt_tokens == len(ids)
    # max_completion_tokens is the newer name of the same limit
    r2 = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=15, temperature=0)
    assert r2.choices[0].message.content == want


def test_chat_streaming(client, tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stop_and_seed(client):
    base = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=30, temperature=0).choices[0].text
    stop = base[10:13]
    r = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == base[: base.index(stop)] and r.choices[0].finish_reason == "stop"
    s = [client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=12, temperature=1.0, top_p=0.95,
                                   seed=seed).choices[0].text for seed in (11, 11, 12)]
    assert s[0] == s[1] and s[0] != s[2]


def test_concurrent_requests_share_steps_and_match_alone(server, client, model, tokenizer):
    _, engine = server
    want = [greedy_text(model, tokenizer, tokenizer.encode(p), 16)[0] for p in PROMPTS]
    steps0 = engine.stats()["decode_steps"]

    def one(i):
        if i % 2:
            chunks = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=16, temperature=0,
                                               stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=16, temperature=0).choices[0].text

    # the engine steps only once every request is queued (or after 60 s), so that they share steps on a
    # loaded machine too, where the first ones could finish before the last ones arrive
    core, step = engine.core, engine.core.step
    gate, deadline = threading.Event(), time.monotonic() + 60

    def gated_step():
        queued = engine.num_waiting() + engine.num_running()
        if not gate.is_set() and queued < len(PROMPTS) and time.monotonic() < deadline:
            gate.wait(0.01)
            return
        gate.set()
        step()

    core.step = gated_step
    try:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(one, range(len(PROMPTS))))
    finally:
        del core.step
    assert got == want
    st = engine.stats()
    assert st["peak_running"] >= 2  # requests really shared decode steps
    assert st["decode_steps"] - steps0 < len(PROMPTS) * 15
    assert st["running"] == 0 and st["waiting"] == 0 and st["batch_rows"] == 0


def test_n_greater_than_one_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", n=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=3)


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"

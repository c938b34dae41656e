"""Every error the server answers, in OpenAI's shape and with the right status; API keys; 429 on a full
queue; client disconnects free the batch row; /metrics; and the server keeps serving afterwards."""
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import make_tiny_llama, serving, wait_for

LONG = 1500  # max_tokens for requests that must still be running when the test acts on them


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_llama(len(tokenizer), seed=4, max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with serving(model, tokenizer, max_batch=4, max_queue=8) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], timeout=30) as c:
        yield c


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def post(http, path, body):
    return http.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                     headers={"content-type": "application/json"})


CASES = [
    # (name, path, body, status, param, code, message fragment)
    ("malformed json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, None, "invalid_json", "malformed JSON"),
    ("bad utf-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None, "invalid_utf8", "UTF-8"),
    ("lone surrogate", "/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', 400, "prompt", "invalid_value",
     "UTF-8"),
    ("not an object", "/v1/completions", b'["tiny"]', 400, None, "invalid_json", "JSON object"),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt", "invalid_value", "prompt"),
    ("missing model", "/v1/completions", {"prompt": "x"}, 400, "model", "invalid_value", "model"),
    ("temperature type", "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400,
     "temperature", "invalid_value", "temperature"),
    ("temperature range", "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}, 400,
     "temperature", "invalid_value", "temperature"),
    ("top_p range", "/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value",
     "top_p"),
    ("max_tokens zero", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens",
     "invalid_value", "max_tokens"),
    ("max_tokens too big", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**6}, 400,
     "max_tokens", "context_length_exceeded", "at most 2047"),
    ("prompt too long", "/v1/completions", {"model": "tiny", "prompt": list(range(5, 2105))}, 400, "prompt",
     "context_length_exceeded", "2100 tokens"),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", None, "empty"),
    ("token out of vocab", "/v1/completions", {"model": "tiny", "prompt": [1, 10**7]}, 400, "prompt", None,
     "outside the vocabulary"),
    ("n=2", "/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n", "unsupported_parameter", "n=2"),
    ("five stops", "/v1/completions", {"model": "tiny", "prompt": "x", "stop": list("abcde")}, 400, "stop",
     "unsupported_parameter", "at most 4"),
    ("logprobs", "/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 2}, 400, "logprobs",
     "unsupported_parameter", "logprobs"),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found", "nope"),
    ("chat no messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "invalid_value",
     "messages"),
    ("chat bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
     400, "messages", "invalid_value", "role"),
    ("chat n=2", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2},
     400, "n", "unsupported_parameter", "n=2"),
    ("chat too long", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "word " * 2100}]}, 400, "messages",
     "context_length_exceeded", "context length"),
    ("chat max_tokens too big", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4000}, 400, "max_tokens",
     "context_length_exceeded", "at most"),
]
# fields that change what a request means: a JSON-mode or tool-calling client must not get free text
USER = [{"role": "user", "content": "x"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
MEANING = [
    ("json mode", "/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("json schema", "/v1/chat/completions",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}, "response_format"),
    ("completions json", "/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("tool_choice required", "/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("tool_choice named", "/v1/chat/completions",
     {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("tools", "/v1/chat/completions", {"tools": [TOOL], "tool_choice": "auto"}, "tools"),
    ("parallel tool calls", "/v1/chat/completions", {"tools": [TOOL], "tool_choice": "none",
                                                     "parallel_tool_calls": True}, "tools"),
    ("functions", "/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("function_call", "/v1/chat/completions", {"function_call": {"name": "f"}}, "function_call"),
    ("audio", "/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("modalities", "/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("web search", "/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
]


@pytest.mark.parametrize("name,path,extra,param", MEANING, ids=[c[0] for c in MEANING])
def test_fields_that_change_the_meaning_are_refused_by_name(http, name, path, extra, param):
    base = {"model": "tiny", "max_tokens": 2}
    base |= {"messages": USER} if path.endswith("chat/completions") else {"prompt": "x"}
    err = error_of(post(http, path, base | extra), 400)
    assert err["param"] == param and err["code"] == "unsupported_parameter", err
    assert param.split("_")[0] in err["message"]


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"tool_choice": "auto"},
    {"function_call": "none"}, {"parallel_tool_calls": True}, {"modalities": ["text"]}, {"tools": []},
], ids=str)
def test_neutral_values_of_those_fields_are_served(http, extra):
    body = {"model": "tiny", "max_tokens": 2, "messages": USER, "temperature": 0} | extra
    r = post(http, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name,path,body,status,param,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_error_cases(http, name, path, body, status, param, code, fragment):
    err = error_of(post(http, path, body), status)
    assert err["param"] == param and err["code"] == code
    assert fragment in err["message"]


def test_oversized_body_is_a_413(http):
    big = json.dumps({"model": "tiny", "prompt": "x" * (4 * 1024 * 1024)}).encode()
    assert error_of(post(http, "/v1/completions", big), 413)["code"] == "request_too_large"


def test_unknown_route_and_method(http):
    assert error_of(http.get("/v1/nothing"), 404)["code"] == "not_found"
    error_of(http.get("/v1/completions"), 405)


def test_still_serving_after_errors(http, server):
    for _, path, body, *_ in CASES:
        post(http, path, body)
    r = post(http, "/v1/completions", {"model": "tiny", "prompt": "still alive?", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert http.get("/health").json()["status"] == "ok"
    st = server[1].stats()
    assert st["running"] == st["waiting"] == st["batch_rows"] == 0


def test_api_key(model, tokenizer):
    with serving(model, tokenizer, api_key="s3cret-key") as (url, _):
        for key in ("wrong", "s3cret-ke", "s3cret-key2"):
            c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as e:
                c.completions.create(model="tiny", prompt="x", max_tokens=2)
            assert e.value.body["code"] == "invalid_api_key"
        err = error_of(httpx.get(url + "/v1/models"), 401)  # no header at all
        assert err["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert [m.id for m in ok.models.list().data] == ["tiny"]
        # probes and scrapers need no key
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200


def stream_body(prompt, max_tokens=LONG):
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}


def test_429_when_the_queue_is_full(model, tokenizer):
    with serving(model, tokenizer, max_batch=1, max_queue=1) as (url, engine), \
            httpx.Client(base_url=url, timeout=30) as http_a, httpx.Client(base_url=url, timeout=30) as http_b:
        with http_a.stream("POST", "/v1/completions", json=stream_body("first")) as a:
            lines_a = a.iter_lines()  # keep a reference: a collected line iterator closes the connection
            next(lines_a)  # A holds the only batch row
            wait_for(lambda: engine.num_running() == 1, what="A running")
            with http_b.stream("POST", "/v1/completions", json=stream_body("second")) as b:
                assert b.status_code == 200
                wait_for(lambda: engine.num_waiting() == 1, what="B queued")
                c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError) as e:
                    c.completions.create(model="tiny", prompt="third", max_tokens=2)
                assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
            assert engine.num_running() == 1
        # both clients gone: row and queue free again, and the server answers normally
        wait_for(lambda: engine.num_running() == 0 and engine.num_waiting() == 0, what="drained")
        r = post(http_a, "/v1/completions", {"model": "tiny", "prompt": "after", "max_tokens": 3})
        assert r.status_code == 200


def test_streaming_disconnect_frees_the_slot(server):
    url, engine = server
    gen0 = engine.stats()["generated_tokens"]
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=stream_body("bye")) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            wait_for(lambda: engine.num_running() == 1, what="running")
        # leaving the block closes the connection mid-stream
    wait_for(lambda: engine.stats()["batch_rows"] == 0, timeout=10, what="row freed")
    assert engine.num_running() == 0
    assert engine.stats()["generated_tokens"] - gen0 < LONG  # cancelled, not run to the end


def test_non_streaming_disconnect_frees_the_slot(server):
    url, engine = server
    gen0 = engine.stats()["generated_tokens"]
    body = {"model": "tiny", "prompt": "bye", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_for(lambda: engine.stats()["batch_rows"] == 0, timeout=10, what="row freed")
    assert engine.stats()["generated_tokens"] - gen0 < LONG


def test_metrics(http, server):
    post(http, "/v1/completions", {"model": "tiny", "prompt": "count me", "max_tokens": 4})
    post(http, "/v1/completions", {"model": "nope", "prompt": "x"})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("llmquant_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("llmquant_requests_total", (("endpoint", "/v1/completions"), ("status", "404")))] >= 1
    assert samples[("llmquant_generation_tokens_total", ())] >= 4
    assert samples[("llmquant_prompt_tokens_total", ())] >= 2
    assert samples[("llmquant_queue_depth", ())] == 0
    assert samples[("llmquant_running_requests", ())] == 0
    assert samples[("llmquant_batch_slots", ())] == 4
    assert samples[("llmquant_request_latency_seconds_count", (("endpoint", "/v1/completions"),))] >= 1
    assert samples[("llmquant_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("llmquant_finished_requests_total", (("reason", "length"),))] >= 1


def test_templating_and_tokenizing_run_off_the_event_loop(model, tokenizer):
    """A slow chat template (a long conversation, a heavy template) must not stall other requests."""
    import copy
    import threading
    import time

    slow = copy.deepcopy(tokenizer)
    real = slow.apply_chat_template

    def apply_chat_template(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    slow.apply_chat_template = apply_chat_template
    with serving(model, slow, max_batch=2, max_queue=4) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        t = threading.Thread(target=post, args=(c, "/v1/chat/completions",
                                                {"model": "tiny", "messages": USER, "max_tokens": 1}))
        t.start()
        time.sleep(0.3)  # the chat request is inside the template now
        t0 = time.monotonic()
        assert c.get("/health").status_code == 200
        waited = time.monotonic() - t0
        t.join()
    assert waited < 0.8, f"/health waited {waited:.2f} s behind the chat template"

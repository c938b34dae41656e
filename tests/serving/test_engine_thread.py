"""The threaded Engine: submit from any thread, bounded queue, recovery from a failed step, shutdown."""
import threading

import pytest

from llmquant.serving.engine import Engine, EngineClosedError, QueueFullError
from llmquant.serving.sampling import SamplingParams

from .helpers import make_tiny_llama, wait_for

P = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


class Collector:
    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.done.set()


@pytest.fixture()
def model(tokenizer):
    return make_tiny_llama(len(tokenizer), seed=6, max_position_embeddings=4096)


def test_submit_from_threads_and_shutdown(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_queue=16).start()
    try:
        sinks = [Collector() for _ in range(6)]
        threads = [threading.Thread(target=engine.submit, args=([5, 6, i + 7], P, s)) for i, s in enumerate(sinks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in sinks:
            assert s.done.wait(30)
            assert s.events[-1].finish_reason == "length" and s.events[-1].completion_tokens == 6
        assert engine.stats()["batch_rows"] == 0
    finally:
        engine.shutdown()
    assert not engine.alive
    with pytest.raises(EngineClosedError):
        engine.submit([1, 2], P, Collector())


def test_queue_bound_and_shutdown_aborts_pending(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_queue=2).start()
    long = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
    first, queued = Collector(), [Collector(), Collector()]
    engine.submit([1, 2, 3], long, first)
    wait_for(lambda: engine.num_running() == 1, what="first running")
    for s in queued:
        engine.submit([1, 2, 3], long, s)
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit([1, 2, 3], long, Collector())
    engine.shutdown()
    for s in [first, *queued]:
        assert s.done.wait(10) and s.events[-1].finish_reason == "abort"


def test_failed_step_errors_the_batch_and_the_engine_recovers(model, tokenizer):
    # a real model with a fault injected: any decode forward over two rows fails
    def fail_on_two_rows(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape == (2, 1):
            raise RuntimeError("injected fault")

    hook = model.register_forward_pre_hook(fail_on_two_rows, with_kwargs=True)
    engine = Engine(model, tokenizer, max_batch=4, max_queue=8).start()
    try:
        long = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
        a, b = Collector(), Collector()
        engine.submit([4, 5, 6], long, a)
        wait_for(lambda: engine.num_running() == 1, what="A running")
        engine.submit([4, 5, 7], long, b)  # B joins A: the next decode step has two rows and fails
        for s in (a, b):
            assert s.done.wait(30)
            assert s.events[-1].finish_reason == "error" and "injected fault" in s.events[-1].error
        assert engine.alive and engine.stats()["batch_rows"] == 0
        hook.remove()
        ok = Collector()
        engine.submit([4, 5, 6], P, ok)
        assert ok.done.wait(30) and ok.events[-1].finish_reason == "length"
    finally:
        hook.remove()
        engine.shutdown()

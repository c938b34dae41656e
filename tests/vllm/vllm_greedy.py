"""Greedy generation with vLLM's offline engine, one model after another in one process.

Run by the end-to-end tests (not collected by pytest): ``python vllm_greedy.py SPEC.json OUT.json``,
where SPEC is ``{"models": [{"path": ..., "quantization": null | "llmquant" | "gptq", "dtype": ...}],
"prompts": [...], "max_tokens": N, "score_texts": [...] (optional)}``. OUT gets, per model, the
generated token ids, their log-probabilities and texts (and, for ``score_texts``, the teacher-forced
log-probability of every token of each text after its first), or the error that stopped it; it is
rewritten after every model. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
executor ``uni``) to spare two interpreter start-ups per model.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time

logger = logging.getLogger("vllm_greedy")


def generate(model: dict, prompts: list[str], max_tokens: int, score_texts: list[str] = ()) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    t0 = time.perf_counter()
    llm = LLM(
        model=model["path"],
        quantization=model.get("quantization"),
        dtype=model.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=128,
        max_num_seqs=8,  # small warm-up batches: the engine's start-up dominates these runs
        max_num_batched_tokens=256,
        tensor_parallel_size=model.get("tensor_parallel_size", 1),
        # one process per rank for tensor parallelism, else the engine in this process
        distributed_executor_backend="mp" if model.get("tensor_parallel_size", 1) > 1 else "uni",
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [
            [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs
        ],
        "texts": [o.outputs[0].text for o in outs],
    }
    if score_texts:  # teacher-forced: the log-probability of every token of each text given the ones before
        scored = llm.generate(list(score_texts), SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        result["scores"] = [
            [lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])] for o in scored
        ]
    result["seconds"] = time.perf_counter() - t0
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    return result


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    results = []
    for model in spec["models"]:
        try:
            results.append(generate(model, spec["prompts"], spec["max_tokens"], spec.get("score_texts", ())))
        except Exception as e:
            logger.exception("generation with %s failed", model)
            results.append({"error": f"{type(e).__name__}: {e}"})
        # after every model: should a later one crash the process, the results so far survive
        tmp = f"{out_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":  # vLLM may start worker processes that re-import the main module
    sys.exit(main(sys.argv[1:]))

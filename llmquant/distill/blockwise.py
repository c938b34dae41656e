"""Block-wise reconstruction: each decoder block of the student learns to give the teacher block's outputs.

Before the end-to-end phase (as in EfficientQAT's Block-AP): for block i, the student's input is what
its already-trained blocks 0..i-1 produce, the target is what the teacher's block i produces from the
teacher's own input, and the loss is each token's squared error divided by that token's target mean
square, averaged over the tokens (a relative error per token). Dividing the whole error by the whole
target's mean square instead lets one token decide everything: in smollm2-135m the first token's
hidden state after blocks 11 and 19 has 170 and 110 times the median token's norm ("massive activations";
its square outweighs the other 255 tokens' together 110 and 45 times, on 256-token windows), and a
whole-tensor relative error then reads 0.001 while the other tokens' outputs are as wrong as in the
blocks before. No output layer runs, so a step costs one block's
forward and backward on a few windows: cheap on two cores. Blocks are run outside the model's forward
with the arguments the model gives each block (attention masks, rotary embeddings), captured by
:mod:`llmquant.quantizers.blocks`, the same machinery as sequential GPTQ.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.distill.trainable import SignDescent
from llmquant.distill.trainer import TrainConfig, lr_factor
from llmquant.quantizers.blocks import BlockRunner, capture, find_layer_stack, make_chunks

logger = logging.getLogger(__name__)


def relative_error(y: torch.Tensor, target: torch.Tensor, target_ms: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``|y - target|^2 / |target|^2`` (``target_ms``: the target's mean square per token)."""
    return ((y - target).pow(2).mean(-1) / target_ms).mean()


def _token_mean_square(y: torch.Tensor) -> torch.Tensor:
    ms = y.pow(2).mean(-1)
    return ms.clamp_min(float(ms.mean()) * 1e-6 + torch.finfo(ms.dtype).tiny)  # an all-zero token counts, not divides by 0


def blockwise_phase(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, lrs: dict[int, float],
                    steps: int, chunk_windows: int = 2, seed: int = 0, progress: bool = True,
                    sign_lrs: dict[int, float] | None = None) -> dict:
    """Train, block by block, the student parameters listed in ``lrs`` (``id(parameter) -> learning
    rate``) with Adam for ``steps`` steps per block on ``windows`` (int64 [N, T]). With ``sign_lrs``
    (code offsets -> step), a second stage of ``steps`` steps trains those by
    :class:`~llmquant.distill.trainable.SignDescent` together with the Adam parameters, and is kept only
    if it lowers the block's error below the first stage's (else the block goes back to the first
    stage's values, codes as stored): a block's codes move only where that helps the block.
    Returns per-block relative errors before and after (and, with codes, without them and whether they
    were kept)."""
    sign_lrs = sign_lrs or {}
    t0 = time.perf_counter()
    stack, t_layers = find_layer_stack(teacher)
    s_layers = student.get_submodule(stack)  # the student's linears are trainable stand-ins now
    if len(s_layers) != len(t_layers):
        raise ValueError(f"block-wise phase: the student has {len(s_layers)} blocks, the teacher {len(t_layers)}")
    rows = list(windows.unbind(0))
    chunks = make_chunks([r.unsqueeze(0) for r in rows], chunk_windows * windows.shape[1], windows.device)
    with torch.no_grad():
        cap_t = capture(teacher, t_layers, chunks)
        cap_s = capture(student, s_layers, chunks)
    x_t, x_s = cap_t.inputs, cap_s.inputs
    g = torch.Generator().manual_seed(seed)
    schedule = TrainConfig(steps=steps, warmup_steps=0)
    report = []
    stages = int(bool(lrs)) + int(bool(sign_lrs))
    bar = tqdm(total=len(s_layers) * steps * max(stages, 1), desc="block-wise", unit="step", disable=not progress)
    for i, (sb, tb) in enumerate(zip(s_layers, t_layers)):
        t_run = BlockRunner(tb, cap_t.calls_of(i), chunks)
        s_run = BlockRunner(sb, cap_s.calls_of(i), chunks)
        with torch.no_grad():
            y_t = [t_run.run(x, j) for j, x in enumerate(x_t)]
        scale = [_token_mean_square(y) for y in y_t]
        params = [(p, lrs[id(p)]) for p in sb.parameters() if id(p) in lrs]
        signed = [(p, sign_lrs[id(p)]) for p in sb.parameters() if id(p) in sign_lrs]
        for p in sb.parameters():
            p.requires_grad_(False)

        def rel_error() -> float:
            with torch.no_grad():
                return sum(float(relative_error(s_run.run(x, j), y_t[j], scale[j]))
                           for j, x in enumerate(x_s)) / len(x_s)

        def train(adam: list, sign: list) -> None:
            """``steps`` steps on one block: Adam for ``adam``, SignDescent for ``sign`` ((param, lr) pairs)."""
            for p, _ in adam + sign:
                p.requires_grad_(True)
            opts = []
            if adam:
                opts.append((torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in adam]), [lr for _, lr in adam]))
            if sign:
                opts.append((SignDescent([{"params": [p], "lr": lr} for p, lr in sign], lr=1.0),
                             [lr for _, lr in sign]))
            for step in range(steps):
                j = int(torch.randint(len(x_s), (1,), generator=g))
                for opt, _ in opts:
                    opt.zero_grad(set_to_none=True)
                loss = relative_error(s_run.run(x_s[j], j), y_t[j], scale[j])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"block-wise phase: block {i} loss is {float(loss.detach())} at step "
                                             f"{step + 1}; lower the learning rate")
                loss.backward()
                factor = lr_factor(step, schedule)  # cosine decay within the block
                for opt, base in opts:
                    for group, lr in zip(opt.param_groups, base):
                        group["lr"] = lr * factor
                    opt.step()
                bar.update(1)
            for p, _ in adam + sign:
                p.requires_grad_(False)
                p.grad = None

        before = after = rel_error()
        entry = {"block": i, "rel_error_before": before}
        if params:
            train(params, [])
            after = rel_error()
        if signed:  # a second stage: codes move too; kept only if the block's error is lower than without them
            without = after
            saved = [p.detach().clone() for p, _ in params]
            train(params, signed)
            with_codes = rel_error()
            kept = with_codes < without
            if kept:
                after = with_codes
            else:  # back to the first stage's values exactly (offsets 0: stored codes), error `without`
                with torch.no_grad():
                    for (p, _), v in zip(params, saved):
                        p.copy_(v)
                    for p, _ in signed:
                        p.zero_()
            entry.update(rel_error_without_codes=without, codes_kept=kept)
        entry["rel_error_after"] = after
        bar.set_postfix(block=i, rel_err=f"{after:.3g}")
        report.append(entry)
        with torch.no_grad():
            x_s = [s_run.run(x, j) for j, x in enumerate(x_s)]
        x_t = y_t
        t_run.close()
        s_run.close()
    bar.close()
    logger.info("block-wise phase: relative error summed over blocks %.4g -> %.4g",
                sum(r["rel_error_before"] for r in report), sum(r["rel_error_after"] for r in report))
    return {"steps_per_block": steps, "windows": int(windows.shape[0]), "blocks": report,
            "seconds": round(time.perf_counter() - t0, 1)}

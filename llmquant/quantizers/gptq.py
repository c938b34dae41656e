"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") on one linear layer.

The layer computes ``y = x @ W.T`` with W [N, K]. GPTQ quantizes W one input column at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse of
the layer's Hessian ``H = 2 X^T X / M`` (X [M, K]: the M calibration tokens that reached the layer), so
that the output error ``||W X^T - Q X^T||`` stays small rather than the weight error.

Usage::

    g = GPTQ(layer)                               # nn.Linear or GPT-2 Conv1D
    handle = layer.register_forward_hook(lambda m, inp, out: g.add_batch(inp[0], out))
    ... run calibration data through the model ...
    packed, stats = g.quantize(LayerQuant(4, 128, True), block_size=128, damp_percent=0.01)

Conventions and choices (numbers as in the paper and the authors' reference code):

* Hessian: running average over calibration *tokens*, accumulated in float32.
* Dampening: ``damp_percent * mean(diag(H))`` is added to the diagonal. If the Cholesky factorization
  still fails, the dampening is raised 10x (a warning is logged each time), up to
  ``MAX_DAMP_RETRIES`` times; then :class:`GPTQError` is raised. There is no silent fallback to RTN.
* Dead inputs (``diag(H) == 0``: the input feature was always 0) get ``H[i, i] = 1`` and ``W[:, i] = 0``.
* Columns are processed in blocks of ``block_size`` with lazy batch updates of the later columns.
  When groups are computed on the fly, the block is rounded to a multiple of the group size so that
  a group never straddles two blocks; lazy batching is exact, so this changes rounding order only.
* Group parameters (scale, zero) come from :func:`llmquant.quantizers.grid.qparams` on the *current*,
  error-updated weights of the group's columns, at the moment the algorithm reaches the group's first
  column (the authors' code reads columns of a group that starts mid-block before that block's
  updates reach them). A ragged last group (K % G != 0) is simply shorter.
* ``act_order``: columns are visited in order of decreasing ``diag(H)``. Without ``static_groups`` the
  weight is stored in that permuted order with ``perm`` (groups are contiguous in stored order, see
  :mod:`llmquant.formats.packing`). With ``static_groups`` every group's parameters are computed up
  front on the original column order, columns are still visited in act-order, and the result is
  stored in the original order without ``perm``.
* ``clip_search`` (not in the paper; the authors' code has a similar ``mse`` option): a group's range
  is not [min, max] but the shrunk range, from a grid of factors 1 ... 0.75, with the least rounding
  error weighted by ``diag(H)`` (each column's input energy). Clipping a few large weights gives the
  rest a finer grid; on gemma3-270m INT4 g128 it took WikiText-2 perplexity from 36.2 to 34.8.
* Float targets (``float_target`` = alpha > 0; ``QuantConfig.float_targets``): in sequential GPTQ a
  layer's inputs X come through layers already quantized, while the model should still compute what
  the float model computes from its own inputs X_f. With ``C = 2/M sum (x_f - x) x^T`` (accumulated
  beside H from both inputs of the same tokens), ``||X_f W^T - X Q^T||^2 = ||X (W' - Q)^T||^2 + const``
  for ``W' = W + W C H^-1``, so the same column loop, run on the target W' instead of W, aims at the
  float model's outputs and makes up for the error the layer receives. This is the "asymmetric
  calibration" of GPTQv2 (Li et al., 2025), written here as a shift of the target. The shift is
  scaled by alpha: the whole of it also fits the calibration tokens' noise (gemma3-270m, rotated GPTQ
  INT3 g128, WikiText-2: 43.00 plain; alpha 0.125 / 0.25 / 0.5 / 1: 41.93 / 41.30 / 42.81 / 47.47;
  a ridge instead, H^-1 dampened by 10% of its mean diagonal, gave 42.42 / 44.42 at alpha 0.5 / 1).
  ``rel_err`` stays the error against W on the layer's own inputs; ``target_shift`` is ``|W' - W| / |W|``.
* Reported error: ``rel_err = ||W X^T - Q X^T||^2 / ||W X^T||^2`` on the calibration inputs, computed
  exactly from H as ``tr(D H D^T) / tr(W H W^T)`` with ``D = W - Q``.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

from llmquant.config import LayerQuant
from llmquant.formats.packing import num_groups
from llmquant.formats.rotation import rotate, rotate_hessian, unpack_signs, unrotate
from llmquant.kernels.registry import PackedWeight
from llmquant.quantizers.grid import qparams, quantize_codes
from llmquant.modules.walk import linear_weight
from llmquant.quantizers.rtn import group_qparams, make_packed

logger = logging.getLogger(__name__)

#: how many times the dampening is raised 10x after a failed Cholesky factorization
MAX_DAMP_RETRIES = 3
#: rows of W processed together; rows are independent in GPTQ, and a bounded slab keeps the
#: per-column updates of very tall layers (an lm_head with 256k rows) inside the cache
ROW_CHUNK = 8192


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """Run the column loop on one CPU thread. Its thousands of small ops gain nothing from a second
    thread, and on a busy machine each op then waits for the other thread (measured 10x slower on a
    loaded 2-core box). The previous thread count is restored afterwards."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


#: the Hessian of layers with K >= 2 * HESSIAN_BLOCK is accumulated on its upper block triangle only
#: (H is symmetric): 10 of 16 block products for K = 2048, measured 25-30% faster than X^T X whole
HESSIAN_BLOCK = 512


def _accumulate_upper(h: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """``h += alpha * x^T x`` on the diagonal blocks and the blocks above them (x: [M, K])."""
    k = h.shape[0]
    if k < 2 * HESSIAN_BLOCK:
        h.addmm_(x.t(), x, alpha=alpha)
        return
    for i in range(0, k, HESSIAN_BLOCK):
        h[i:i + HESSIAN_BLOCK, i:].addmm_(x[:, i:i + HESSIAN_BLOCK].t(), x[:, i:], alpha=alpha)


def _fill_lower(h: torch.Tensor) -> None:
    """Copy the upper block triangle of ``h`` onto the lower one."""
    for i in range(HESSIAN_BLOCK, h.shape[0], HESSIAN_BLOCK):
        h[i:i + HESSIAN_BLOCK, :i] = h[:i, i:i + HESSIAN_BLOCK].t()


class GPTQError(RuntimeError):
    """GPTQ cannot quantize a layer (Hessian not positive definite even after extra dampening, ...)."""


def inverse_hessian_cholesky(
    h: torch.Tensor, damp_percent: float, name: str = "layer"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of ``(H + damp * mean(diag H) * I)^-1`` (so ``H^-1 = U^T U``).

    Returns ``(U, damp_percent_used)``. Raises :class:`GPTQError` when even 10**MAX_DAMP_RETRIES times
    the dampening does not make the factorization succeed.
    """
    mean_diag = float(torch.diagonal(h).mean())
    rel = damp_percent
    for attempt in range(MAX_DAMP_RETRIES + 1):
        # With J the reversal permutation and J H J = L L^T (Cholesky), H^-1 = U^T U for the upper
        # triangular U = J L^-1 J, which is therefore the upper Cholesky factor of H^-1. One
        # factorization and one triangular solve: faster and steadier than inverting H and
        # factorizing again (LAPACK's potri was measured 10-30x slower on a busy 2-core machine).
        hd = h.flip(0, 1)
        hd.diagonal().add_(rel * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            u = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
            if torch.isfinite(u).all():
                return u, rel
        if attempt == MAX_DAMP_RETRIES:
            break
        # damp_percent == 0 is allowed by the config; 10x of 0 would not help
        new_rel = rel * 10 if rel > 0 else 1e-4
        logger.warning(
            "GPTQ %s: Hessian [%d x %d] not positive definite with damp_percent=%g; retrying with %g",
            name, h.shape[0], h.shape[1], rel, new_rel,
        )
        rel = new_rel
    raise GPTQError(
        f"GPTQ {name}: Hessian [{h.shape[0]} x {h.shape[1]}] is not positive definite even with "
        f"damp_percent={rel:g} (tried {MAX_DAMP_RETRIES + 1} dampenings); the calibration inputs of "
        "this layer are degenerate (too few tokens, or non-finite activations)"
    )


class GPTQ:
    """Hessian accumulator and GPTQ solver for one linear layer (weight W [N, K])."""

    def __init__(self, layer: nn.Module, name: str = "layer") -> None:
        w = linear_weight(layer)
        if w.dim() != 2:
            raise ValueError(f"GPTQ {name}: expected a weight of shape [N, K], got {tuple(w.shape)}")
        self.layer = layer
        self.name = name
        self.rows, self.columns = w.shape  # N, K
        self._h = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=w.device)
        self._lower_stale = False  # add_batch updates the upper block triangle only
        #: with float targets: ``C = 2/M sum (x_float - x) x^T`` over the same tokens (see add_batch)
        self._c: torch.Tensor | None = None
        self.nsamples = 0  # calibration tokens seen
        #: after quantize(): the weight the quantized layer applies, float32 [N, K], input column order
        self.quantized_weight: torch.Tensor | None = None

    # --- Hessian -------------------------------------------------------------------------------
    @property
    def H(self) -> torch.Tensor:
        """The Hessian ``2/M * X^T X``: float32 [K, K]."""
        if self._lower_stale:
            _fill_lower(self._h)
            self._lower_stale = False
        return self._h

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        self._h = value
        self._lower_stale = False

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None, *,
                  float_inp: torch.Tensor | None = None) -> None:
        """Add the layer inputs ``inp`` [..., K] (every leading position is one token) to H.

        Keeps ``H = 2/M * sum x x^T`` over the M tokens seen so far. ``out`` is accepted so this can
        be called from a forward hook; it is not used. ``float_inp``: what the same tokens gave this
        layer in the float model (same shape); then ``C = 2/M * sum (x_float - x) x^T`` is kept too,
        and :meth:`quantize` aims at the float model's outputs (see there). Give it on every batch or
        on none.
        """
        if inp.shape[-1] != self.columns:
            raise ValueError(f"GPTQ {self.name}: input has {inp.shape[-1]} features, expected K={self.columns}")
        x = inp.reshape(-1, self.columns).to(device=self._h.device, dtype=torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        if (float_inp is None) != (self._c is None) and self.nsamples > 0:
            raise ValueError(f"GPTQ {self.name}: float_inp must be given with every batch or with none")
        total = self.nsamples + m
        if float_inp is not None:
            if float_inp.shape != inp.shape:
                raise ValueError(f"GPTQ {self.name}: float_inp has shape {tuple(float_inp.shape)}, "
                                 f"the inputs {tuple(inp.shape)}")
            dx = float_inp.reshape(-1, self.columns).to(device=x.device, dtype=torch.float32) - x
            if self._c is None:
                self._c = torch.zeros_like(self._h)
            self._c.mul_(self.nsamples / total)
            self._c.addmm_(dx.t(), x, alpha=2.0 / total)
        self._h.mul_(self.nsamples / total)
        _accumulate_upper(self._h, x, 2.0 / total)
        self._lower_stale = True
        self.nsamples = total

    def adopt_hessian(self, other: GPTQ) -> None:
        """Use ``other``'s Hessian (layers that read the same input tensor, e.g. q/k/v projections)."""
        if other.columns != self.columns:
            raise ValueError(f"GPTQ {self.name}: cannot share a Hessian of K={other.columns} with K={self.columns}")
        self.H = other.H  # quantize() never modifies self.H
        self._c = other._c
        self.nsamples = other.nsamples

    # --- quantization --------------------------------------------------------------------------
    @torch.no_grad()
    def quantize(
        self,
        scheme: LayerQuant,
        block_size: int = 128,
        damp_percent: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
        clip_search: bool = False,
        rot_signs: torch.Tensor | None = None,
        float_target: float = 0.0,
        compact: bool = False,
    ) -> tuple[PackedWeight, dict]:
        """Quantize the layer's weight; returns the packed weight and a stats dict:

        ``rel_err`` (``||W X^T - Q X^T||^2 / ||W X^T||^2`` on the calibration inputs, from H),
        ``damp_percent`` (the dampening finally used), ``dead_columns``, ``nsamples`` (tokens), ``seconds``.
        The layer itself is not modified. ``rot_signs`` (the stored uint8 signs of
        :mod:`llmquant.formats.rotation`): quantize ``W R`` against the Hessian ``R^T H R`` of the
        rotated inputs; the packed codes are the rotated weight's, ``quantized_weight`` the weight
        they stand for (``Q R^T``). ``float_target`` (alpha > 0; needs ``float_inp`` in
        :meth:`add_batch`): quantize the target ``W + alpha W C H^-1`` instead of W (module docstring).
        ``compact``: every scale on the compact 8-bit grid (``QuantConfig.compact_qparams``).
        """
        t0 = time.perf_counter()
        if self.nsamples == 0:
            raise GPTQError(f"GPTQ {self.name}: no calibration inputs reached this layer (add_batch never called)")
        if block_size <= 0:
            raise ValueError(f"GPTQ {self.name}: block_size must be positive, got {block_size}")
        if not torch.isfinite(self.H).all():
            raise GPTQError(f"GPTQ {self.name}: the Hessian has non-finite values (the layer's inputs overflowed)")
        w_orig = linear_weight(self.layer).detach().to(device=self.H.device, dtype=torch.float32)
        if not torch.isfinite(w_orig).all():
            raise ValueError(f"GPTQ {self.name}: weight has non-finite values (NaN or inf); refusing to quantize")
        n, k = self.rows, self.columns
        bits = scheme.bits
        G = k if scheme.group_size == -1 else scheme.group_size
        ng = num_groups(k, scheme.group_size)

        w_given, shift = w_orig, 0.0
        if float_target:
            w_orig, shift = self._float_target(w_orig, float_target, damp_percent)
        h = self.H.clone()
        d = None
        if rot_signs is not None:
            d = unpack_signs(rot_signs, k).to(w_orig.device)
            w_orig = rotate(w_orig, d)
            h = rotate_hessian(h, d)
        w = w_orig.clone()
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1
        w[:, dead] = 0

        static = static_groups or scheme.group_size == -1
        importance = torch.diagonal(h).clone() if clip_search else None  # input energy per column
        if static_groups:
            # every group's grid fixed up front, on the input column order
            scale, zero = group_qparams(w, scheme, clip=clip_search, importance=importance, compact=compact)
        elif scheme.group_size == -1:
            # the one group of each row starts at column 0, where W is still the input weight
            scale, zero = (t.unsqueeze(1) for t in qparams(w, bits, scheme.sym, clip_search, importance, compact))
        else:
            scale = torch.empty(n, ng, dtype=torch.float32, device=w.device)
            zero = torch.empty(n, ng, dtype=torch.float32, device=w.device)

        perm = None
        if act_order:
            perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
            w = w[:, perm]
            h = h[perm][:, perm]
            if importance is not None and not static_groups:
                importance = importance[perm]
        # group of each visited column: with static grids the group of its input column, otherwise
        # groups are contiguous in visiting (= stored) order
        visit = perm if (perm is not None and static_groups) else torch.arange(k, device=w.device)
        col_group = visit // G

        u, damp_used = inverse_hessian_cholesky(h, damp_percent, self.name)
        del h

        step = block_size if static else G * max(1, block_size // G)
        q = torch.empty(n, k, dtype=torch.float32, device=w.device)  # visiting order
        codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
        col_group_list = col_group.tolist()
        for r0 in range(0, n, ROW_CHUNK):
            r1 = min(r0 + ROW_CHUNK, n)
            # work on W^T: one column of W is one contiguous row, and the per-column updates of the
            # later columns touch one contiguous slab (a strided update is ~10x slower on CPU)
            wt = w[r0:r1].t().contiguous()
            with _one_thread(wt.device):
                qt = self._solve_rows(
                    wt, u, scale[r0:r1], zero[r0:r1],
                    bits=bits, sym=scheme.sym, G=G, step=step, static=static, col_group=col_group_list,
                    importance=importance, compact=compact,
                )
            q[r0:r1] = qt.t()
            # the codes are recovered exactly from Q = (c - z) * s: |c - z| <= 255 and s >= 2**-14,
            # so Q / s lies within 1e-4 of the integer c - z
            codes[r0:r1] = quantize_codes(q[r0:r1], scale[r0:r1, col_group], zero[r0:r1, col_group], bits)
            del wt, qt
        del u, w

        if perm is not None:
            q_in = torch.empty_like(q)
            q_in[:, perm] = q
        else:
            q_in = q
        if perm is not None and static_groups:
            codes_in = torch.empty_like(codes)
            codes_in[:, perm] = codes
            packed = make_packed(codes_in, scale, zero, scheme)
        else:
            packed = make_packed(codes, scale, zero, scheme, perm=perm)
        self.quantized_weight = q_in if d is None else unrotate(q_in, d)

        stats = {
            "rel_err": self._relative_error(w_given, self.quantized_weight),
            **({"target_shift": shift} if float_target else {}),
            "damp_percent": damp_used,
            "dead_columns": int(dead.sum()),
            "nsamples": self.nsamples,
            "seconds": time.perf_counter() - t0,
        }
        return packed, stats

    @staticmethod
    def _solve_rows(
        wt: torch.Tensor,
        u: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        *,
        bits: int,
        sym: bool,
        G: int,
        step: int,
        static: bool,
        col_group: list[int],
        importance: torch.Tensor | None = None,
        compact: bool = False,
    ) -> torch.Tensor:
        """The GPTQ column loop on a slab of R rows, transposed: ``wt`` = W^T float32 [K, R] in visiting
        order (modified in place); u: upper Cholesky factor of H^-1 [K, K]. Fills ``scale``/``zero``
        [R, NG] unless static; returns Q^T [K, R]. ``importance`` [K] (visiting order): search each
        group's clipping range, weighting columns by it (see :func:`qparams`); None: [min, max]."""
        k = wt.shape[0]
        qt = torch.empty_like(wt)
        for i1 in range(0, k, step):
            i2 = min(i1 + step, k)
            w1 = wt[i1:i2]  # a view: updates land in wt
            err1 = torch.empty_like(w1)
            u1 = u[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                g = col_group[col]
                if not static and col % G == 0:
                    # a new group starts here; its columns all lie in this block (step % G == 0)
                    imp = None if importance is None else importance[col:col + G]
                    s_g, z_g = qparams(w1[i:i + G].t(), bits, sym, imp is not None, imp, compact)
                    scale[:, g] = s_g
                    zero[:, g] = z_g
                s, z = scale[:, g], zero[:, g]
                wc = w1[i]
                qc = qt[col]
                # fake quantization on the stored grid: (clamp(round(w / s) + z) - z) * s, in float32
                torch.mul(quantize_codes(wc, s, z, bits).sub_(z), s, out=qc)
                e = torch.sub(wc, qc, out=err1[i]).div_(u1[i, i])
                if i + 1 < i2 - i1:
                    w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1.0)
            if i2 < k:
                # lazy batch update of every later column with this block's errors
                wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)
        return qt

    def _float_target(self, w: torch.Tensor, alpha: float, damp_percent: float) -> tuple[torch.Tensor, float]:
        """``W + alpha W C H^-1`` (H dampened as in the solve) and the relative size of the shift."""
        if self._c is None:
            raise GPTQError(f"GPTQ {self.name}: float_target needs the float model's inputs (add_batch(float_inp=...))")
        if not torch.isfinite(self._c).all():
            raise GPTQError(f"GPTQ {self.name}: the float/quantized input cross term has non-finite values")
        h = self.H.clone()
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1
        u, _ = inverse_hessian_cholesky(h, damp_percent, self.name)
        del h
        out = torch.empty_like(w)
        for r0 in range(0, self.rows, ROW_CHUNK):
            wr = w[r0:r0 + ROW_CHUNK]
            out[r0:r0 + ROW_CHUNK] = torch.addmm(wr, (wr @ self._c) @ u.t(), u, alpha=alpha)
        shift = float((out - w).norm() / w.norm().clamp_min(1e-30))
        return out, shift

    def _relative_error(self, w: torch.Tensor, q: torch.Tensor) -> float:
        """``||W X^T - Q X^T||^2 / ||W X^T||^2`` = tr(D H D^T) / tr(W H W^T) with D = W - Q."""
        num = 0.0
        den = 0.0
        for r0 in range(0, self.rows, ROW_CHUNK):
            wr = w[r0:r0 + ROW_CHUNK]
            dr = wr - q[r0:r0 + ROW_CHUNK]
            num += float(((dr @ self.H) * dr).sum())
            den += float(((wr @ self.H) * wr).sum())
        if den <= 0:
            return 0.0 if num <= 0 else float("inf")
        return num / den

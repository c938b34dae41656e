"""Distillation: a teacher buys back what low bits cost.

* :func:`recover`: an llmquant checkpoint (RTN, GPTQ, mixed) learns from its float teacher; scales
  train (optionally norms, and codes moved one step at most in the block-wise phase); the output is an ordinary
  llmquant checkpoint (:mod:`llmquant.distill.trainable`).
* :func:`distill`: any float student learns from a teacher with the same tokenizer.
* :mod:`llmquant.distill.qat`: fake quantization on the exact grid, for any training loop.
* The loss (:mod:`~llmquant.distill.loss`): ``alpha * T**2 * KL + (1 - alpha) * CE`` against the
  teacher's top-k logits; the loop (:mod:`~llmquant.distill.trainer`): 8-bit AdamW, gradient
  accumulation, resumable state, a JSON log.
"""
from llmquant.distill.loss import KDLoss, TopK
from llmquant.distill.qat import FakeQuantLinear, prepare_qat
from llmquant.distill.recipes import DataConfig, DistillConfig, RecoverConfig, distill, recover
from llmquant.distill.teacher import TokenizerMismatch
from llmquant.distill.trainer import TrainConfig, TrainingDiverged, TrainingInterrupted

__all__ = [
    "DataConfig", "DistillConfig", "FakeQuantLinear", "KDLoss", "RecoverConfig", "TokenizerMismatch", "TopK",
    "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "distill", "prepare_qat", "recover",
]

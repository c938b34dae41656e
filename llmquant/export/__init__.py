"""Writing llmquant checkpoints in other projects' formats (GPTQ, compressed-tensors)."""

"""HTTP service returning a teacher model's token logprobs."""

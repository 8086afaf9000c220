"""Pivotal-token discovery: prompts, next-token logits, divergence, generator, judge, queue."""

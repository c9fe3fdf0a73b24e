"""Streaming, mergeable accumulators. They know nothing of models: any arrays work."""

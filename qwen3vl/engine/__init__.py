"""Generation engine: sampling, stopping, batching and the request loop."""

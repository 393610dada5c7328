"""Engines: the model code behind prefill and decode nodes (mock, torch; vLLM comes later)."""

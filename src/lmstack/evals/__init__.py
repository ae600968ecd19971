"""Evaluation apps: each reaches models only through `lmstack.client.LLMClient`."""

"""Serving models over HTTP: the project's own OpenAI-compatible server (:mod:`ecoquant.serve.openai_server`)."""

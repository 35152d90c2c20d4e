"""An OpenAI-compatible HTTP server: one base model, named adapters chosen per request, batched generation."""

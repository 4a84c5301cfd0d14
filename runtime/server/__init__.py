"""`glmrt serve`: an OpenAI-compatible HTTP server over the async engine (extra `glmrt[serve]`)."""

"""Ways in from the outside: servers over the serving engine and their tools
(`openai_server` + `serve`: the OpenAI-compatible HTTP server; `bench_serving`: its load generator)."""

"""`pagoda gateway`: one OpenAI endpoint over many upstreams (docs/gateway.md)."""

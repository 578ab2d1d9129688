"""The engine core, in the engine process: scheduler, KV cache manager and block pool, the process loop.
Imports no torch; the executor it drives does."""

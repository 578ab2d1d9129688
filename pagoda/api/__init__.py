"""The API's types, shared by the HTTP server, the engine's front end and the engine core; no torch."""

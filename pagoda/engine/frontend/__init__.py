"""The engine's front end, in the HTTP (or offline) process: the core client, tokenizer and detokenizer,
output processing. Imports no torch."""

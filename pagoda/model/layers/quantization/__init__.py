"""Quantized weights: which ``LinearMethod`` each linear layer gets, and the methods themselves."""

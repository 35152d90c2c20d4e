"""Evaluation: answer metrics (exact match, token F1) and the few-shot sweep."""

"""Experiments built on the engine: the toy world's AGE-against-ESD comparison and its model's quality."""

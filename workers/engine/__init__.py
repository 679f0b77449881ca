"""Serving engine: engine loop -> scheduler -> block manager -> sequence; model runner -> model.

Everything but the model runner is torch-free, so the mock engine reuses it unchanged.
"""

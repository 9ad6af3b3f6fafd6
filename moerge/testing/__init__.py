"""Offline builders of tiny models, tokenizers, experts and data (tests, the demo and benchmarks).

Kept out of the library's build and serve code: nothing in ``moerge`` imports this package except the demo.
"""

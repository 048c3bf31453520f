"""Locally generated model families: random Llama weights and a locally trained tokenizer.

No weights can be downloaded here, so every model the project serves is made by
:func:`warmserve.models.make.make_family`. Nothing in this package imports vLLM.
"""

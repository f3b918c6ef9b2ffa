"""Corpus -> target -> store: prompt corpora, the BIG-bench default corpus, distribution stores
and the collection that fills them."""

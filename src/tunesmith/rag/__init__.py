"""Retrieval-augmented generation: documents → token chunks → embeddings → FAISS → grounded, cited answers.

Modules: documents (find and read files), chunking (token windows), embedding (sentence-transformers),
index (FAISS + JSON metadata on disk), retrieve (query expansion, fusion), ask (grounded prompt, answer),
evaluate (recall@k, MRR, answer F1 with and without retrieval).
"""

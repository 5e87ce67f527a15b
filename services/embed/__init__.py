"""The embed service: dense (MiniLM or a remote endpoint) and sparse (BM25) vectors of chunks
and queries, micro-batched across messages (see :mod:`.app`)."""

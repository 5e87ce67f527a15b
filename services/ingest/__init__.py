"""ingest: ``docs.submitted`` → ``docs.chunked`` | ``docs.rejected`` (DESIGN.md §4).

Validates submitted documents, parses text / Markdown / HTML / BEIR JSONL into structural
blocks, deduplicates by content, numbers versions and chunks to the embedding model's token
budget.  Modules: :mod:`.app` (the service), :mod:`.ingestor` (one batch, end to end),
:mod:`.validate`, :mod:`.formats`, :mod:`.chunking`, :mod:`.versions`.
"""

"""SFT data: schemas (record -> Example), the validating loader (file:line errors), hash-based
splits, prompt formats, tokenization with response-only labels, batching, and the report."""

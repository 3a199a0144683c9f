"""Where text comes from and how it becomes tokens: documents from the hub or local files,
the BPE tokenizer and cached token shards, and made-up stories for offline runs. Imports
config/ and store/ only."""

"""Data: one document schema, the field's formats, streaming shards, a synthetic world."""

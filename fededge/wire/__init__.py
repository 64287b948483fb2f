"""The wire format: topics, every message kind, encode/decode with validation, logit codecs.
No sockets and no torch: what travels, not how."""

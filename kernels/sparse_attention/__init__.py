"""sparse_attention."""

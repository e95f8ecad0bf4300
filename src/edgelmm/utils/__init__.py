"""Small shared helpers: atomic file writes, memory monitoring."""

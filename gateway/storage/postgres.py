"""PostgreSQL storage (placeholder until implemented)."""

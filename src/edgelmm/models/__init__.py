"""Model adapters: one per architecture family, chosen by config.model_type."""

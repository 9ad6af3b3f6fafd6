"""Conflict analysis between experts (per layer and module group) and routed-unit selection."""

"""The method: pairs and batches, models, hidden states, prefix reuse, the adapter, the loss, directions."""

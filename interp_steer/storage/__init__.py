"""Storage: what a run writes and proves its own (manifests, claims), artifacts, exports."""

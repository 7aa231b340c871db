"""Packaging: the accuracy gate, the golden set, staging, archives and the store's manifest (build_mar.sh)."""

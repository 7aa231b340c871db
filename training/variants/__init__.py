"""The techniques, one module per variant they make: fp32, sparse, pruned, int8 (and pruned_int8, dynamic_int8),
bf16, distilled. Each module runs alone (python -m training.variants.<module> PARENT_DIR); training.optimize lists
them all."""

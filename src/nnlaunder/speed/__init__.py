"""Speed, with the function computed unchanged: im2col kernels for few-channel convs (`kernels`), the
native conv-pool kernel and its build (`native`, `csrc/conv_pool.c`), exact model rewrites for Neural
Cleanse (`rewrite`: ReLU/pool reorder, batch-norm folding, fused conv-pool), and the per-machine tuned
plans (`plans`). Depends only on torch and `device`; every test compares against the plain path."""

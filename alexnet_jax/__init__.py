"""alexnet-jax: the 2012 ImageNet network of Krizhevsky, Sutskever & Hinton, in JAX."""

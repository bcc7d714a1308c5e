"""Static pruning: thin a backbone once, for every input, before gates are trained."""

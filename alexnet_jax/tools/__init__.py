"""Tools above the run layer: the paper's figures, Figure 1, flag sweeps, weight import."""
